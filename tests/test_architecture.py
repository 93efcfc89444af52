"""A newcomer's map of the code holds (docs/architecture.md):

- every ``dvc.yaml`` stage's command runs the module named like the stage (``stages/<stage>.py``);
- imports go one way down the layers, with no cycles (import-linter, configured in pyproject.toml);
- every stage declares, in ``dvc.yaml``, source folders or modules covering everything it imports,
  and every params key its code reads, so DVC reruns exactly what a change affects;
- ``src/`` holds no test or benchmark hooks.
"""

from __future__ import annotations

import inspect
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import grimp
import pytest
import yaml

from transferbench.cli import COMMANDS
from transferbench.config import DataSettings, Settings

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _body(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep their definition under "do"


def test_imports_go_one_way_with_no_cycles() -> None:
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_runs_the_module_named_like_it(name: str) -> None:
    assert (SRC / "transferbench" / "stages" / f"{name}.py").is_file(), f"no stages/{name}.py for stage {name}"
    words = _body(STAGES[name])["cmd"].split()
    assert words[0] == "transferbench", words
    run = COMMANDS[words[1]][2]
    assert f"from transferbench.stages import {name}\n" in inspect.getsource(run), \
        f"`transferbench {words[1]}` does not run stages/{name}.py"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("transferbench")


def _runs(graph: grimp.ImportGraph, module: str) -> set[str]:
    """Every module importing ``module`` executes: its imports, transitively, and their parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.find_modules_directly_imported_by(name)
    return seen


def _file(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_declares_the_source_it_runs(graph: grimp.ImportGraph, name: str) -> None:
    deps = [d for d in _body(STAGES[name])["deps"] if d.startswith("src/")]
    for dep in deps:
        assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"
    for module in sorted(_runs(graph, f"transferbench.stages.{name}")):
        path = _file(module).relative_to(ROOT).as_posix()
        assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), \
            f"stage {name} runs {module} ({path}) but dvc.yaml does not list it (or a folder above it) in its deps"


SECTIONS = Settings.model_fields
# Sections a stage hands whole to code that reads them as ``data.<key>``, which is scanned too: reading the
# section whole does not count as reading all its keys (the generator's settings stay out of the fine-tunes).
SCANNED_BY_KEY = {"data"}
CATALOGUE_READS = {"task": "tasks.<item>", "backbone": "backbones.<item>", "finetune_for": "backbones.<item>"}


def _code(source: str) -> str:
    """``source`` with its comments and string literals blanked (docstrings and messages name keys too)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    chars = list(source)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.STRING):
            begin = starts[token.start[0] - 1] + token.start[1]
            end = starts[token.end[0] - 1] + token.end[1]
            chars[begin:end] = [c if c == "\n" else " " for c in chars[begin:end]]
    return "".join(chars)


def _keys_read(source: str) -> set[str]:
    """The params keys a module's code reads: ``settings.<section>[.<key>]``, ``settings.task(...)`` and the
    like, and ``data.<key>`` of a ``DataSettings``."""
    source = _code(source)
    read: set[str] = set()
    for section, key in re.findall(r"(?<![\w.])settings\.(\w+)(?:\.(\w+))?", source):
        if section in CATALOGUE_READS:
            read.add(CATALOGUE_READS[section])
            read |= {"finetune"} if section == "finetune_for" else set()
        elif section in SECTIONS:
            fields = getattr(SECTIONS[section].annotation, "model_fields", {})
            if key in fields:
                read.add(f"{section}.{key}")
            elif section not in SCANNED_BY_KEY:
                read.add(section)  # the section whole (handed on, or a derived property)
    for key in re.findall(r"(?<![\w.])data\.(\w+)", source):
        if key in DataSettings.model_fields:
            read.add(f"data.{key}")
        elif key == "region_of":
            read.add("data.regions")
    return read


def _declared(stage: dict) -> set[str]:
    params = {p if isinstance(p, str) else next(iter(p)) for p in _body(stage).get("params", [])}
    return {re.sub(r"\$\{item(\.\w+)?\}", "<item>", p) for p in params}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_params_key_a_stage_reads_is_declared(graph: grimp.ImportGraph, name: str) -> None:
    declared = _declared(STAGES[name])
    for module in sorted(_runs(graph, f"transferbench.stages.{name}") - {"transferbench.config"}):  # defines them
        for key in sorted(_keys_read(_file(module).read_text())):
            assert any(key == d or key.startswith(d + ".") for d in declared), \
                f"stage {name} reads params key {key} ({module}) without declaring it in dvc.yaml: {sorted(declared)}"


def test_the_params_scan_sees_reads_and_ignores_other_names() -> None:
    source = ("x = settings.finetune.lr; y = settings.ray; settings.task(t); data.splits_dir; data.region_of(c)\n"
              "settings.data; other.data.cache_dir; settings.finetune_for(b); obj.settings.study\n"
              "f('settings.tracking'); g(\"data.raw_dir\")  # settings.compare\n")
    assert _keys_read(source) == {"finetune.lr", "ray", "tasks.<item>", "data.splits_dir", "data.regions",
                                  "backbones.<item>", "finetune"}


def test_src_holds_no_test_or_benchmark_hooks() -> None:
    forbidden = {r"\bunittest\b": "unittest", r"kill_at|KILL_AT|fault_inject|FaultInjection": "fault injection",
                 r"start_environment|worker_env\b": "a benchmark probe"}
    for path in sorted((SRC / "transferbench").rglob("*.py")):
        text = path.read_text()
        for pattern, what in forbidden.items():
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)}: {what} in product code"
