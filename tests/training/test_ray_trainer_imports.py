"""Ray Train's controller unpickles ``train_worker`` by importing its module: keep that module light."""

from __future__ import annotations

import json
import subprocess
import sys

# Each costs the controller import time at every run's start (~2.4 s together on 2 cores);
# the worker imports them itself, through ray_worker.
HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "transferbench.training.ray_worker")


def test_the_module_ray_train_unpickles_imports_none_of_the_workers_libraries() -> None:
    code = ("import json, sys; from transferbench.training.ray_trainer import train_worker; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(done.stdout) == []
