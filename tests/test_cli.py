"""The command line: --help lists the stages, MLproject calls only real subcommands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from transferbench.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_registered_subcommand() -> None:
    result = subprocess.run([sys.executable, "-m", "transferbench.cli", "--help"],
                            capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in result.stdout


def test_bad_params_exit_non_zero_naming_the_key(tmp_path: Path, capsys) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["ray"]["num_wrokers"] = 2
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(params), "check-params"]) == 2
    err = capsys.readouterr().err
    assert "ray.num_wrokers" in err and "did you mean 'num_workers'" in err


def test_finetune_and_retrieve_refuse_the_other_kind_naming_the_right_command(capsys) -> None:
    params = str(ROOT / "params.yaml")
    assert main(["--params", params, "finetune", "--task", "synthetic_retrieval", "--backbone", "test_resnet"]) == 2
    assert "retrieval task trains nothing; run `transferbench retrieve --task synthetic_retrieval" in \
        capsys.readouterr().err
    assert main(["--params", params, "retrieve", "--task", "synthetic", "--backbone", "test_resnet"]) == 2
    assert "a classification task; retrieve runs tasks of kind retrieval" in capsys.readouterr().err


def test_mlproject_entry_points_call_existing_subcommands() -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    required = {"main", "split", "validate", "finetune", "sensitivity", "compare"}
    assert required <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        for part in entry["command"].split("&&"):
            words = shlex.split(part.strip())
            if words[0] != "transferbench":
                continue
            subcommand = next(w for w in words[1:] if not w.startswith("-") and not w.startswith("{"))
            assert subcommand in COMMANDS, f"MLproject entry point {name!r} calls unknown '{subcommand}'"


def test_console_script_exit_still_joins_threads_runs_atexit_and_flushes(tmp_path: Path) -> None:
    """``entry`` skips the interpreter's teardown, not what an exit must do, and keeps main's code."""
    marks = tmp_path / "marks"
    code = f"""
import atexit, pathlib, sys, threading, time
from transferbench.cli import entry
marks = pathlib.Path({str(marks)!r})
def late():
    time.sleep(0.5)
    with marks.open("a") as f:
        f.write("thread\\n")
threading.Thread(target=late).start()
# an idle thread-pool worker never shut down (MLflow's artifact downloads leave one): threading's exit hook stops it
import concurrent.futures
concurrent.futures.ThreadPoolExecutor(max_workers=1).submit(lambda: None).result()
atexit.register(lambda: marks.open("a").write("atexit\\n"))
sys.stdout.write("stage output\\n")  # piped stdout is block-buffered: lost unless flushed
sys.argv = ["transferbench", "--params", {str(tmp_path / "missing.yaml")!r}, "check-params"]
entry()
"""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=buffered)
    assert done.returncode == 2, done.stderr  # main's code for a missing params file
    assert "missing.yaml" in done.stderr
    assert done.stdout == "stage output\n"
    assert marks.read_text().splitlines() == ["thread", "atexit"]
