"""Start-up imports that every fine-tune stage pays: keep the driver's and Ray Train's controller's light."""

from __future__ import annotations

import json
import subprocess
import sys

# Each costs the controller import time at every run's start (~2.4 s together on 2 cores);
# the worker imports them itself, through ray_worker.
WORKER_LIBRARIES = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "transferbench.engine.ray_worker")


def imported(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after ``statement``."""
    code = f"import json, sys; {statement}; print(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def test_the_module_ray_train_unpickles_imports_none_of_the_workers_libraries() -> None:
    # Ray Train's controller unpickles train_worker by importing its module.
    assert imported("from transferbench.engine.ray_driver import train_worker", WORKER_LIBRARIES) == []


def test_the_finetune_stage_leaves_metrics_and_figures_to_the_worker() -> None:
    # The stage needs torch and timm (the weights check), not scikit-learn or matplotlib (~1 s).
    assert imported("import transferbench.stages.finetune", ("sklearn", "matplotlib")) == []
