"""Pipeline overhead (issue #8, item 4): Ray start-up, no-op ``dvc repro`` and the CI smoke study.

- ``ray_startup``: ``ray.init`` of a fresh local cluster, then a ``TorchTrainer`` whose worker
  only reports its torch thread count (so the report also shows the threads Ray gives a worker).
- ``dvc_noop``: wall time of ``dvc repro`` when ``dvc status`` says every stage is up to date;
  not measured otherwise (it would then run the pipeline).
- ``smoke_study`` (opt-in, ~25 min on 2 cores): ``transferbench fetch`` + ``dvc repro`` of the
  committed smoke study in a temporary ``git clone`` (the checkout is never touched), with the
  peak summed RSS of the process tree, split into compute (every MLflow run's ``epoch_seconds``)
  and setup (the rest: Ray and worker start-up, MLflow stores, data stages, model logging).
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
from pathlib import Path
from typing import Any

import psutil


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
    import ray

    started = time.perf_counter()
    if address:
        ray.init(address=address, configure_logging=True, logging_level="WARNING")
    else:  # always a fresh local cluster: never join one another process started
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=True,
                 logging_level="WARNING")
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
        command = f"{bin_dir / 'transferbench'} fetch && {bin_dir / 'dvc'} repro"
        started = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        with PeakTreeMemory(proc.pid) as memory:
            output, _ = proc.communicate()
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            return {"not_measured": f"smoke study failed (exit {proc.returncode}): {output.strip()[-500:]}"}
        compute, runs = _compute_seconds(f"sqlite:///{clone / 'mlruns.db'}")
    return {"wall_seconds": wall, "peak_tree_rss_bytes": memory.peak, "compute_seconds": compute,
            "setup_seconds": wall - compute, "runs_with_epochs": runs, "commit": "HEAD of the checkout (clone)"}
