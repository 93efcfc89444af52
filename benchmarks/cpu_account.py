"""Where a Ray Train worker's training time goes: the same plain loop in four places, CPU-accounted.

``python -m benchmarks.cpu_account [--backbone resnet18] [--pairs 2]`` runs the benchmark's plain
timm loop (``training.run_plain``: same model, data path, optimiser) in

- ``main``: this process's main thread (Ray initialised, as in the benchmark's plain arm);
- ``thread``: a second thread of this process;
- ``ray_train``: the training function of a one-worker Ray Train ``TorchTrainer``, the way the
  pipeline runs (with the engine's ``WORKER_ENV``: one malloc arena, fixed mmap/trim thresholds);
- ``ray_train_default_malloc``: the same without ``WORKER_ENV`` (glibc's defaults);

alternated ``--pairs`` times. Over the steady epochs (the first is warm-up) each place reports,
from ``/proc/self/task/*/stat`` and ``/proc/stat``:

- images/s;
- CPU seconds per image of the thread that runs the loop plus torch's OpenMP pool (the step);
- CPU seconds per image of the process's other threads (Ray's core-worker threads, MLflow ...);
- CPU seconds per image of every other process on the machine (``/proc/stat`` busy time minus
  this process's);
- minor page faults, involuntary context switches (preempted) and voluntary ones (went to sleep,
  e.g. at an OpenMP barrier) per image of the step's threads;
- the CPU seconds of every other process, by name (Ray's daemons and Ray Train's actors, named by
  their actor class: ``overhead.process_cpu``).

CPU seconds and fault counts do not depend on how busy the machine is, so the places compare
even on a noisy machine: more step CPU per image means the step itself is slower there; the same
step CPU with fewer images/s means CPU went to something else. Output: JSON (``--out``) and a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from benchmarks import training
from benchmarks.overhead import cpu_used_by_name, process_cpu
from transferbench.engine.cluster import connect
from transferbench.engine.spec import WORKER_ENV

CLK = os.sysconf("SC_CLK_TCK")
PLACES = ("main", "thread", "ray_train", "ray_train_default_malloc")


def start_environment(keys: Iterable[str]) -> dict[str, str | None]:
    """``keys`` as this process was started with them (what glibc read), not as ``os.environ`` has them now."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:  # not Linux
        return {k: os.environ.get(k) for k in keys}
    start = dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: start.get(k) for k in keys}


def _stat(path: str) -> tuple[str, float, int]:
    """A ``/proc/.../stat`` file: (command name, CPU s (user + system), minor faults)."""
    raw = Path(path).read_text()
    fields = raw[raw.rindex(")") + 2:].split()  # fields[0] is stat field 3 (state)
    return raw[raw.index("(") + 1:raw.rindex(")")], (int(fields[11]) + int(fields[12])) / CLK, int(fields[7])


def _threads() -> dict[int, tuple[str, float, int, int, int]]:
    """This process's threads: tid -> (name, CPU s, minor faults, involuntary and voluntary context switches)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name, cpu, minflt = _stat(f"/proc/self/task/{tid}/stat")
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:
            continue
        switches = {k: int(v) for k, _, v in (line.partition(":\t") for line in status.splitlines())
                    if k in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")}
        out[int(tid)] = (name, cpu, minflt, switches["nonvoluntary_ctxt_switches"], switches["voluntary_ctxt_switches"])
    return out


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK


@dataclasses.dataclass
class Mark:
    wall: float
    busy: float
    threads: dict[int, tuple[str, float, int, int, int]]
    processes: dict[int, tuple[str, float]]


def _mark() -> Mark:
    return Mark(time.perf_counter(), _machine_busy(), _threads(), process_cpu())


def account(start: Mark, end: Mark, images: int, loop_tid: int) -> dict[str, Any]:
    """Per-image costs between two marks taken in the process that ran the loop."""
    def delta(tid: int, field: int) -> float:
        before = start.threads.get(tid)
        return end.threads[tid][field] - (before[field] if before else 0)

    cpu = {tid: delta(tid, 1) for tid in end.threads}
    # The step: the loop's thread and torch's OpenMP pool, i.e. the threads that ran at least a
    # quarter of the loop thread's CPU (the pool threads run about as much as it does).
    step = {tid for tid, c in cpu.items() if tid == loop_tid or c >= 0.25 * cpu[loop_tid]}
    process_cpu = sum(cpu.values())
    seconds = end.wall - start.wall
    others = cpu_used_by_name(start.processes, end.processes, (pid for pid in end.processes if pid != os.getpid()))
    return {"images": images, "seconds": seconds, "ips": images / seconds,
            "step_threads": sorted(end.threads[t][0] for t in step),
            "step_cpu_ms_per_image": 1000 * sum(cpu[t] for t in step) / images,
            "process_other_cpu_ms_per_image": 1000 * (process_cpu - sum(cpu[t] for t in step)) / images,
            "machine_other_cpu_ms_per_image": 1000 * (end.busy - start.busy - process_cpu) / images,
            "minflt_per_image": sum(delta(t, 2) for t in step) / images,
            "nivcsw_per_image": sum(delta(t, 3) for t in step) / images,
            # voluntary: the step's threads went to sleep (e.g. libgomp's team at a barrier once it stops spinning)
            "nvcsw_per_image": sum(delta(t, 4) for t in step) / images,
            "other_processes_cpu_s": {k: round(v, 2) for k, v in sorted(others.items(), key=lambda kv: -kv[1])
                                      if v >= 0.02}}


def measured_loop(work: training.Workload, *, threads: int, epochs: int) -> dict[str, Any]:
    """``run_plain`` in the calling thread, accounted from the end of its first epoch to its last."""
    marks: list[Mark] = []
    rates = training.run_plain(work, threads=threads, epochs=epochs, on_epoch=lambda: marks.append(_mark()))
    batch = work.protocol.batch_size
    per_epoch = len(work.filenames["train"]) // batch * batch  # drop_last
    out = account(marks[0], marks[-1], (len(marks) - 1) * per_epoch, threading.get_native_id())
    out["epoch_ips"] = rates
    return out


def _in_thread(work: training.Workload, *, threads: int, epochs: int) -> dict[str, Any]:
    box: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: box.append(measured_loop(work, threads=threads, epochs=epochs)),
                              name="loop-thread")
    worker.start()
    worker.join()
    return box[0]


def _in_ray_train(work: training.Workload, *, threads: int, epochs: int, storage: Path,
                  worker_env: dict[str, str] | None) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_fn(config: dict[str, Any]) -> None:
        result = measured_loop(config["work"], threads=config["threads"], epochs=config["epochs"])
        result["worker_env"] = start_environment(WORKER_ENV)  # what glibc read when the worker started
        Path(config["out"]).write_text(json.dumps(result))  # one machine: the driver reads it back

    name = f"cpu-account-{time.monotonic_ns()}"
    out = storage / f"{name}.json"
    storage.mkdir(parents=True, exist_ok=True)
    run_config = RunConfig(name=name, storage_path=str(storage),
                           worker_runtime_env={"env_vars": worker_env} if worker_env else None)
    config = {"work": work, "threads": threads, "epochs": epochs, "out": str(out)}
    TorchTrainer(train_fn, train_loop_config=config, run_config=run_config,
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": float(threads)})).fit()
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    from transferbench.config import load_settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=6, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="the first is warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--places", default=",".join(PLACES), help="comma-separated subset of %(default)s")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", default="reports/bench/cpu_account.json")
    args = p.parse_args(argv)

    import ray

    settings = load_settings(args.params)
    protocol = settings.finetune.model_copy(update={"mode": "full", "warmup_iters": 0, "img_size": args.img_size})
    chosen = [p.strip() for p in args.places.split(",")]
    if unknown := sorted(set(chosen) - set(PLACES)):
        raise SystemExit(f"--places: unknown {unknown}; choose from {list(PLACES)}")
    places: dict[str, list[dict[str, Any]]] = {place: [] for place in PLACES if place in chosen}
    with tempfile.TemporaryDirectory(prefix="transferbench-cpu-") as tmp:
        root = Path(tmp)
        splits = training.write_task(root, n_train=args.steps * protocol.batch_size, n_eval=8,
                                     side=round(args.img_size / 0.85))
        work = training.prepare(args.backbone, settings.backbone(args.backbone), protocol, splits_dir=splits,
                                cache_dir=root / "cache")
        connect(None, num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False)
        kwargs = {"threads": args.threads, "epochs": args.epochs}
        run = {"main": lambda: measured_loop(work, **kwargs),
               "thread": lambda: _in_thread(work, **kwargs),
               "ray_train": lambda: _in_ray_train(work, storage=root / "ray", worker_env=dict(WORKER_ENV), **kwargs),
               "ray_train_default_malloc": lambda: _in_ray_train(work, storage=root / "ray", worker_env=None,
                                                                 **kwargs)}
        for _ in range(args.pairs):
            for place, runs in places.items():
                runs.append(run[place]())
        ray.shutdown()
    result = {"backbone": args.backbone, "img_size": args.img_size, "batch": protocol.batch_size,
              "steps": args.steps, "epochs": args.epochs, "threads": args.threads, "places": places}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(out)

    keys = ("ips", "step_cpu_ms_per_image", "process_other_cpu_ms_per_image", "machine_other_cpu_ms_per_image",
            "minflt_per_image", "nivcsw_per_image", "nvcsw_per_image")
    print(f"{args.backbone}, {args.img_size} px, batch {protocol.batch_size}, {args.threads} threads; "
          f"medians over {args.pairs} runs each (alternated)")
    print(f"{'place':26s} " + " ".join(f"{k.replace('_per_image', '/img'):>24s}" for k in keys))
    for place, runs in places.items():
        print(f"{place:26s} " + " ".join(f"{statistics.median(r[k] for r in runs):24.2f}" for k in keys))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
