"""What one ``transferbench finetune`` stage spends its wall time on, in Ray Train local mode.

``python -m benchmarks.stage_cost`` runs the real stage command (a fresh process, as ``dvc repro``
starts it) on a generated two-class task, ``--repeats`` times, and splits each run's wall time into
phases. The command is started through a probe (``python -c PROBE``) that, before calling the
console script's ``entry()``, wraps the functions each phase is made of and
``importlib._bootstrap._find_and_load`` (the loading of a module not yet imported), and at exit
writes the time spent in each. Time is charged to the innermost phase running, so phases never
overlap and they add up to the wall time:

- ``interpreter``: from the parent's ``Popen`` to the probe's first line (Python's own start);
- ``imports``: loading modules (torch, timm, torchvision, MLflow, SQLAlchemy, Ray Train, ...), when
  and wherever they are first imported;
- ``settings``: ``load_settings``; ``data_and_model``: manifests, the model probe, the image cache;
- ``mlflow``: the run registry (store, parent/child runs, params, tags, dataset inputs), the
  tracker's start, per-epoch logging and close, system-metrics start-up;
- ``training``: ``loop.fit``'s steps; ``checkpoints``: the per-epoch ``torch.save`` +
  ``ray.train.report``; ``evaluation``: predictions and the task kind's metrics (every epoch's val
  pass, and the best weights' val/test); ``figures``: the kind's figures (confusion matrix) and the
  learning curve; ``model_logging``: ``mlflow.pytorch``;
- ``other``: the rest of ``main`` (Ray Train's local controller, result files, argument parsing);
- ``exit``: from ``main``'s return to the process's end, as the parent sees it.

The probe only measures: it is benchmark code, and the stage's code is unchanged. A run's phases
are written to ``--out``/stage_cost.json with the command that reproduces them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.stats import Summary
from benchmarks.training import TASK, write_task

REPO = Path(__file__).resolve().parents[1]
PHASES = ("interpreter", "imports", "settings", "data_and_model", "mlflow", "training", "checkpoints", "evaluation",
          "figures", "model_logging", "other", "exit")

# Runs in the stage's process. Attribute -> phase; each wrapper charges its time (less the time of
# phases nested inside it) to its phase.
PROBE = r'''
import atexit, importlib._bootstrap as bootstrap, json, sys, time
started = time.time()
totals, stack, mark = {}, ["other"], [time.perf_counter()]

def switch(phase):
    now = time.perf_counter()
    totals[stack[-1]] = totals.get(stack[-1], 0.0) + now - mark[0]
    mark[0] = now
    if phase is None:
        stack.pop()
    else:
        stack.append(phase)

def charged(phase, function):
    def wrapper(*args, **kwargs):
        switch(phase)
        try:
            return function(*args, **kwargs)
        finally:
            switch(None)
    return wrapper

bootstrap._find_and_load = charged("imports", bootstrap._find_and_load)
from transferbench import cli, config
from transferbench.engine import loop, ray_worker, tracking
from transferbench.engine.tasks import classification
from transferbench.stages import finetune as stage
WRAP = {
    "settings": [(cli, "load_settings")],
    "data_and_model": [(stage, "prepare_inputs")],
    "mlflow": [(tracking.RunRegistry, name) for name in ("__init__", "study_run", "child_run", "log_params",
                                                          "set_tags", "log_manifests", "log_metrics")]
              + [(tracking.MlflowTracker, name) for name in ("__init__", "log_metrics", "set_tags", "close",
                                                             "last_logged_step")]
              + [(ray_worker._Tracking, "__call__")],
    "training": [(loop, "fit")],
    "checkpoints": [(ray_worker._Checkpointing, "__call__"), (ray_worker, "latest_checkpoint")],
    "evaluation": [(classification.Classification, "evaluate"), (loop, "predict")],
    "figures": [(classification.Classification, "figures"), (ray_worker, "learning_curve_figure")],
    "model_logging": [(tracking.MlflowTracker, "log_model")],
}
for phase, targets in WRAP.items():
    for owner, name in targets:
        setattr(owner, name, charged(phase, getattr(owner, name)))
main = cli.main

def timed_main(argv=None):
    try:
        return main(argv)
    finally:
        switch(None)
        totals["main_end"] = time.time()

cli.main = timed_main
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps({"started": started, **totals})))
sys.argv = ["transferbench", *sys.argv[2:]]
cli.entry()
'''


def project(root: Path, *, backbone: str, seeds: int, epochs: int, steps: int, img_size: int) -> Path:
    """A params.yaml (the shipped one, on a generated task) and its data under ``root``; returns it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    batch = params["finetune"]["batch_size"]
    splits = write_task(root, n_train=steps * batch, n_eval=2 * batch, side=round(img_size / 0.85))
    params["study"] = {"name": "stage-cost", "tasks": [TASK], "backbones": [backbone], "seeds": list(range(seeds))}
    params["tasks"] = {TASK: {"dataset": "synthetic", "metric": "accuracy", "split": {"rule": "random"}}}
    params["data"].update(splits_dir=str(splits), cache_dir=str(root / "cache"))
    params["finetune"].update(max_epochs=epochs, early_stop_patience=epochs + 1, img_size=img_size)
    params["ray"].update(num_workers=0, storage_path=str(root / "ray_results"))
    params["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_location=str(root / "art"))
    params["compare"].update(metrics_dir=str(root / "metrics"), learning_floors={})
    params["sensitivity"].update(tasks=[], backbones=[])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(params: Path, *, backbone: str, root: Path) -> dict[str, float]:
    """One ``transferbench finetune`` process through the probe: seconds per phase (they sum to its wall time)."""
    out = root / f"phases-{time.monotonic_ns()}.json"
    command = [sys.executable, "-c", PROBE, str(out), "--params", str(params), "finetune", "--task", TASK,
               "--backbone", backbone, "--metrics-dir", str(root / "metrics"), "--plots-dir", str(root / "plots"),
               "--fresh"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.time()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"the stage failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    raw = json.loads(out.read_text())
    phases = {k: v for k, v in raw.items() if k in PHASES}
    phases["interpreter"] = raw["started"] - started
    phases["exit"] = ended - raw["main_end"]
    phases["wall"] = ended - started
    return phases


def measure(*, backbone: str, seeds: int, epochs: int, steps: int, img_size: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="transferbench-stage-cost-") as tmp:
        root = Path(tmp)
        params = project(root, backbone=backbone, seeds=seeds, epochs=epochs, steps=steps, img_size=img_size)
        run_stage(params, backbone=backbone, root=root)  # warm the image cache and the OS's file cache
        runs = [run_stage(params, backbone=backbone, root=root) for _ in range(repeats)]
    phases = {k: Summary.of([r.get(k, 0.0) for r in runs]).to_dict() for k in (*PHASES, "wall")}
    fixed = [r["wall"] - r.get("training", 0.0) for r in runs]
    return {"backbone": backbone, "seeds": seeds, "epochs": epochs, "steps_per_epoch": steps, "img_size": img_size,
            "repeats": repeats, "phases_s": phases, "wall_minus_training_s": Summary.of(fixed).to_dict(),
            "fixed_per_run_s": Summary.of([f / seeds for f in fixed]).to_dict(), "runs": runs}


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# One `transferbench finetune` stage in Ray Train local mode, by phase", "",
             f"`{command}`; seconds, median [min-max] over repeats; phases add up to the wall time.", "",
             "| phase | " + " | ".join(f"{r['backbone']}, {r['seeds']} seed(s)" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for phase in (*PHASES, "wall"):
        lines.append(f"| {phase} | " + " | ".join(Summary(**r["phases_s"][phase]).text(2) for r in results) + " |")
    lines.append("| **wall - training** | " + " | ".join(
        Summary(**r["wall_minus_training_s"]).text(2) for r in results) + " |")
    lines.append("| **fixed cost per run** | " + " | ".join(
        Summary(**r["fixed_per_run_s"]).text(2) for r in results) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_cost", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="test_resnet", help="a backbone of params.yaml (default %(default)s)")
    p.add_argument("--seeds", default="1,3", help="seeds per stage to measure, comma-separated (default %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="training steps per epoch (default %(default)s)")
    p.add_argument("--img-size", type=int, default=64, help="input side (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="stage runs per configuration (default %(default)s)")
    p.add_argument("--out", default="reports/bench", help="output directory (default %(default)s)")
    args = p.parse_args(argv)
    command = " ".join(["python -m benchmarks.stage_cost", *(argv if argv is not None else sys.argv[1:])])
    results = [measure(backbone=args.backbone, seeds=int(n), epochs=args.epochs, steps=args.steps,
                       img_size=args.img_size, repeats=args.repeats) for n in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage_cost.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    text = markdown(results, command)
    (out / "stage_cost.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
