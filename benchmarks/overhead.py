"""Pipeline overhead (issue #8, item 4): Ray start-up, no-op ``dvc repro`` and the CI smoke study.

- ``ray_startup``: ``ray.init`` of a fresh local cluster, then a ``TorchTrainer`` whose worker
  only reports its torch thread count (so the report also shows the threads Ray gives a worker).
- ``ray_train_helpers``: CPU s/s of Ray Train's helper actors (controller, placement-group
  cleaner, preemption watcher, ...) while a one-worker TorchTrainer's function idles: what a
  run takes from the machine besides training.
- ``dvc_noop``: wall time of ``dvc repro`` when ``dvc status`` says every stage is up to date;
  not measured otherwise (it would then run the pipeline).
- ``smoke_study`` (opt-in, ~15 min on 2 cores): ``transferbench fetch`` + ``transferbench
  with-ray -- dvc repro`` (what ``make repro`` runs) of the committed smoke study in a
  temporary ``git clone`` (the checkout is never touched), with the peak summed RSS of the
  process tree, split into compute (every MLflow run's ``epoch_seconds``) and setup (the rest:
  Ray and worker start-up, MLflow stores, data stages, model logging).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.stats import Summary
from transferbench.engine.cluster import connect


class PeakTreeMemory:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread.

    Shared pages (Ray's object store) count once per process, so this is an upper bound.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_init(*, address: str | None, num_cpus: int) -> float:
    """Start (or join) the Ray cluster the benchmark uses; returns seconds taken."""
    started = time.perf_counter()
    if address:
        connect(address)
    else:  # always a fresh local cluster: never join one another process started
        connect("local", num_cpus=num_cpus, include_dashboard=False)
    return time.perf_counter() - started


# The parts of a no-op TorchTrainer's wall time (ray_worker_startup's view).
STARTUP_PHASES = ("worker_process_s", "worker_entry_s", "teardown_s")


def ray_worker_startup(*, storage: Path, num_workers: int, cpus_per_worker: float) -> tuple[float, dict[str, Any]]:
    """Seconds for a TorchTrainer with a no-op worker to start, run and finish; and what the worker saw.

    The worker's view splits the start-up by wall clock (this machine's; on a remote cluster the
    clocks of two nodes are compared): ``worker_process_s``, from ``fit()`` until Ray created the
    worker process (the Train controller actor's start, placement group); ``worker_entry_s``, until
    the training function was entered (the worker imports ray and torch, the gloo process group);
    ``teardown_s``, from the function's return until ``fit()`` returned.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    view_file = storage / f"worker_view-{time.time_ns()}.json"

    def report_threads(config: dict[str, Any]) -> None:  # a closure: pickled by value (no benchmarks import)
        import time

        entered = time.time()
        import json
        import os

        import psutil
        import torch

        view = {"torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                "process_created": psutil.Process().create_time(), "entered": entered}
        with open(config["out"], "w") as fh:  # Ray Train v2 keeps no metrics reported without a checkpoint
            json.dump(view, fh)

    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(report_threads, train_loop_config={"out": str(view_file)},
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(name=f"startup-{time.time_ns()}", storage_path=str(storage)))
    started, wall = time.perf_counter(), time.time()
    trainer.fit()
    seconds = time.perf_counter() - started
    view = json.loads(view_file.read_text())
    view.update(worker_process_s=view.pop("process_created") - wall, worker_entry_s=view.pop("entered") - wall)
    view["teardown_s"] = seconds - view["worker_entry_s"]
    return seconds, view


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid -> (name, CPU s so far, user + system).

    A Ray worker process is named by its actor class (``ray::TrainController.run`` ->
    ``ray::TrainController``), any other process by its executable; this one is ``benchmark``.
    """
    out = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        argv0 = (proc.info["cmdline"] or [proc.info["name"] or "?"])[0]
        name = argv0.split(".")[0] if argv0.startswith("ray::") else Path(argv0.split()[0] or "?").name
        out[proc.pid] = ("benchmark" if proc.pid == os.getpid() else name, times.user + times.system)
    return out


def cpu_used_by_name(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                     pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds that ``pids`` used between two ``process_cpu`` snapshots, summed by process name.

    A pid only in ``after`` started in between: all its CPU counts.
    """
    used: dict[str, float] = {}
    for pid in pids:
        name, cpu = after[pid]
        used[name] = used.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
    return used


# The training worker itself and Ray's pooled idle workers are not Ray Train helpers.
NOT_HELPERS = ("ray::RayTrainWorker", "ray::IDLE")


def ray_train_helpers(*, storage: Path, cpus_per_worker: float, settle_s: float = 10.0,
                      window_s: float = 15.0) -> dict[str, Any]:
    """CPU seconds per second of every process while a one-worker TorchTrainer's function idles.

    The training function only waits, so what the window sees is what a Ray Train run costs
    the machine besides training: its helper actors (``ray::`` processes other than the worker:
    TrainController, PlacementGroupCleaner, PreemptionWatcher, SynchronizationActor, ...), the
    idle worker's own Ray threads, and Ray's daemons (raylet, gcs_server, the per-node agents),
    which the plain loop's process pays for too (Ray is initialised in both arms). Helpers are
    the ``ray::`` processes that the run started, the worker and idle pooled workers aside; an
    idle pooled worker that Ray turns into a helper counts (CI saw the TrainController take one). The
    window opens ``settle_s`` after the function is entered and lasts ``window_s``: Ray starts
    some helpers after the worker group, and each spends its first seconds importing (with 3 s,
    on a busy machine, the window caught that start-up: ~1 CPU s/s instead of ~0.06).
    ``train_helpers_cpu_per_s`` sums the helpers; ``machine_share`` is that over the machine's
    CPUs.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stamp = time.time_ns()
    entered, release = storage / f"helpers-entered-{stamp}", storage / f"helpers-release-{stamp}"

    def idle(config: dict[str, Any]) -> None:  # a closure: pickled by value (no benchmarks import)
        import pathlib
        import time

        pathlib.Path(config["entered"]).touch()
        deadline = time.monotonic() + config["timeout_s"]
        while not pathlib.Path(config["release"]).exists() and time.monotonic() < deadline:
            time.sleep(0.5)

    storage.mkdir(parents=True, exist_ok=True)
    timeout_s = 120 + settle_s + window_s
    trainer = TorchTrainer(idle, train_loop_config={"entered": str(entered), "release": str(release),
                                                    "timeout_s": timeout_s},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(name=f"helpers-{stamp}", storage_path=str(storage)))
    # names before the run: Ray may hand an actor an idle pooled worker (``ray::IDLE``) that is
    # already running, so a helper is a process whose actor name is new, not only a new pid
    existing = {pid: name for pid, (name, _) in process_cpu().items()}
    fit = threading.Thread(target=trainer.fit, name="ray-train-helpers-fit", daemon=True)
    fit.start()
    deadline = time.monotonic() + timeout_s
    while not entered.exists():
        if not fit.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the idle TorchTrainer never entered its function ({entered} missing)")
        time.sleep(0.2)
    time.sleep(settle_s)
    before, started = process_cpu(), time.perf_counter()
    time.sleep(window_s)
    after, seconds = process_cpu(), time.perf_counter() - started
    release.touch()
    fit.join(timeout=120)
    if fit.is_alive():
        raise RuntimeError(f"the idle TorchTrainer did not finish within 120 s of its release ({release})")

    def rates(pids: Iterable[int]) -> dict[str, float]:  # CPU s per s, summed by process name
        return {name: used / seconds for name, used in cpu_used_by_name(before, after, pids).items()}

    by_process = rates(after)
    helpers = rates(pid for pid, (name, _) in after.items()
                    if existing.get(pid) != name and name.startswith("ray::") and name not in NOT_HELPERS)
    total = sum(helpers.values())
    cpus = psutil.cpu_count() or 1
    return {"window_s": seconds, "cpus": cpus, "train_helpers": helpers, "train_helpers_cpu_per_s": total,
            "machine_share": total / cpus, "worker_idle_cpu_per_s": by_process.get("ray::RayTrainWorker", 0.0),
            "by_process": dict(sorted(by_process.items(), key=lambda kv: -kv[1]))}


def summarise_helpers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``ray_train_helpers`` runs -> each helper's and the total's median and spread (CPU s per s)."""
    names = sorted({name for run in runs for name in run["train_helpers"]})
    return {"window_s": Summary.of([r["window_s"] for r in runs]).to_dict(), "cpus": runs[0]["cpus"],
            "cpu_per_s": {n: Summary.of([r["train_helpers"].get(n, 0.0) for r in runs]).to_dict() for n in names},
            **{k: Summary.of([r[k] for r in runs]).to_dict()
               for k in ("train_helpers_cpu_per_s", "machine_share", "worker_idle_cpu_per_s")}}


def _dvc() -> str:
    here = Path(sys.executable).parent / "dvc"  # the venv running the benchmark
    return str(here) if here.is_file() else (shutil.which("dvc") or "dvc")


def dvc_noop(repo: Path, *, repeats: int) -> dict[str, Any]:
    """Seconds of ``dvc repro`` with nothing to do, or why it was not measured."""
    env = {**os.environ, "PATH": f"{Path(_dvc()).parent}:{os.environ.get('PATH', '')}"}
    try:
        status = subprocess.run([_dvc(), "status", "--json"], cwd=repo, capture_output=True, text=True,
                                timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"not_measured": f"dvc status failed: {exc}"}
    if status.returncode != 0:
        return {"not_measured": f"dvc status exited {status.returncode}: {status.stderr.strip()[-300:]}"}
    try:
        stale = json.loads(status.stdout or "{}")
    except json.JSONDecodeError:
        return {"not_measured": f"dvc status printed no JSON: {status.stdout.strip()[-300:]}"}
    if stale:
        return {"not_measured": f"pipeline not up to date ({len(stale)} stages changed; run `dvc repro` first)"}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run = subprocess.run([_dvc(), "repro"], cwd=repo, capture_output=True, text=True, timeout=600, env=env)
        if run.returncode != 0:
            return {"not_measured": f"dvc repro exited {run.returncode}: {run.stderr.strip()[-300:]}"}
        times.append(time.perf_counter() - started)
    return {"seconds": times}


def _compute_seconds(tracking_uri: str) -> tuple[float, int]:
    """Sum of every run's ``epoch_seconds`` in an MLflow store, and the number of runs that logged it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    total, runs = 0.0, 0
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], max_results=5000):
            history = client.get_metric_history(run.info.run_id, "epoch_seconds")
            if history:
                runs += 1
                total += sum(m.value for m in history)
    return total, runs


def smoke_study(repo: Path, *, mirror: str | None) -> dict[str, Any]:
    """``dvc repro`` of the committed smoke study in a temporary clone: wall time, peak memory, split."""
    if not mirror:
        return {"not_measured": "TRANSFERBENCH_DATA_MIRROR is not set (the smoke study needs the COVID-19 mirror)"}
    bin_dir = Path(_dvc()).parent
    with tempfile.TemporaryDirectory(prefix="transferbench-smoke-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
               "TRANSFERBENCH_DATA_MIRROR": str(Path(mirror).resolve())}
        env.pop("MLFLOW_TRACKING_URI", None)
        # as `make repro` runs it: every stage on one Ray head node for the whole run
        tb = bin_dir / "transferbench"
        command = f"{tb} fetch && {tb} with-ray -- {bin_dir / 'dvc'} repro"
        started = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        output, marks = [], []
        with PeakTreeMemory(proc.pid) as memory:
            for line in proc.stdout:  # DVC runs stages one at a time: stamp each as it starts
                output.append(line)
                if line.startswith(STAGE_START):
                    marks.append((time.perf_counter() - started, line[len(STAGE_START):].split("'")[0]))
            proc.wait()
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            return {"not_measured": f"smoke study failed (exit {proc.returncode}): {''.join(output).strip()[-500:]}"}
        compute, runs = _compute_seconds(f"sqlite:///{clone / 'mlruns.db'}")
    return {"wall_seconds": wall, "peak_tree_rss_bytes": memory.peak, "compute_seconds": compute,
            "setup_seconds": wall - compute, "runs_with_epochs": runs, "commit": "HEAD of the checkout (clone)",
            "before_first_stage_s": marks[0][0] if marks else wall, "stages": stage_seconds(marks, wall)}


STAGE_START = "Running stage '"


def stage_seconds(marks: list[tuple[float, str]], end: float) -> dict[str, dict[str, Any]]:
    """(start s, stage name) in run order -> per stage kind (``finetune@a-b-0`` -> ``finetune``): how many
    ran, their seconds summed, each one's, and their median and spread; a stage lasts until the next
    starts (the last: until ``end``)."""
    each: dict[str, dict[str, float]] = {}
    stops = [start for start, _ in marks[1:]] + ([end] if marks else [])
    for (start, name), stop in zip(marks, stops, strict=True):
        each.setdefault(name.split("@")[0], {})[name] = stop - start
    return {kind: {"count": len(times), "seconds": sum(times.values()), "each": times,
                   "per_stage": Summary.of(list(times.values())).to_dict()} for kind, times in each.items()}
