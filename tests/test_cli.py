"""The command line: --help lists the stages, MLproject calls only real subcommands."""

from __future__ import annotations

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
