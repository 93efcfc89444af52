"""`transferbench repro --jobs N` (issue #25) on a real DVC pipeline in a temporary git repo.

The pipeline is a diamond (a -> b, c -> d) plus an independent stage, a foreach stage, params, a
metrics file and plots, so ``dvc.lock`` holds every kind of entry DVC writes. Each stage appends
its start and end time to a log outside DVC's view, which shows what ran at the same time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from transferbench.runner import Runner, StageFailed, plan, stage_resources

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A stage: note its start, sleep, write its output from its inputs, note its end.
STAGE = """
import sys, time, pathlib
name, seconds, out, *inputs = sys.argv[1:]
with open("../times.log", "a") as log: log.write(f"{name} start {time.time()}\\n")
time.sleep(float(seconds))
text = name + "".join(pathlib.Path(i).read_text() for i in inputs)
pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(out).write_text(text)
with open("../times.log", "a") as log: log.write(f"{name} end {time.time()}\\n")
"""


def _pipeline(seconds: float = 1.5, fail: str | None = None) -> dict:
    def stage(name: str, out: str, *inputs: str, **extra: object) -> dict:
        cmd = f"python stage.py {name} {seconds} {out} {' '.join(inputs)}"
        if name == fail:
            cmd = "python -c 'import sys; print(\"c broke\"); sys.exit(3)'"
        return {"cmd": cmd, "deps": ["stage.py", *inputs], "outs": [out], **extra}

    return {"stages": {
        "a": stage("a", "out/a.txt"),
        "b": stage("b", "out/b.txt", "out/a.txt"),
        "c": stage("c", "out/c.txt", "out/a.txt"),
        "d": {**stage("d", "out/d.txt", "out/b.txt", "out/c.txt"), "outs": [],
              "metrics": [{"out/d.txt": {"cache": False}}]},
        "e": {**stage("e", "out/e.json"), "params": ["study.name"],
              "cmd": f"python stage.py e {seconds} out/e.json && python -c \"import json; "
                     f"json.dump({{'x': [1, 2], 'y': [3, 4]}}, open('out/e.json', 'w'))\"",
              "outs": [], "plots": [{"out/e.json": {"cache": False}}]},
        "f": {"foreach": ["one", "two"], "do": stage("f_${item}", "out/f_${item}.txt", "out/a.txt")},
    }}


def _git_dvc_repo(path: Path, pipeline: dict) -> Path:
    path.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    (path / "stage.py").write_text(STAGE)
    (path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (path / "params.yaml").write_text((REPO / "params.yaml").read_text())  # the CLI reads the real settings
    return path


def _times(repo: Path) -> dict[str, tuple[float, float]]:
    marks: dict[str, dict[str, float]] = {}
    for line in (repo.parent / "times.log").read_text().splitlines():
        name, what, when = line.split()
        marks.setdefault(name, {})[what] = float(when)
    return {name: (m["start"], m["end"]) for name, m in marks.items()}


def _cli(repo: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "transferbench"), "repro", *args], cwd=repo, env=env, text=True,
                          capture_output=True, **kwargs)


def test_concurrent_run_writes_the_lock_a_sequential_dvc_repro_writes(tmp_path: Path) -> None:
    sequential = _git_dvc_repo(tmp_path / "seq" / "repo", _pipeline())
    subprocess.run([str(BIN / "dvc"), "repro"], cwd=sequential, check=True, capture_output=True)
    concurrent = _git_dvc_repo(tmp_path / "con" / "repo", _pipeline())

    done = _cli(concurrent, "--jobs", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 stage(s) to run, 0 up to date; up to 3 at once" in done.stdout
    assert "[f@two] " in done.stdout  # each line of a stage's output carries its name

    assert yaml.safe_load((concurrent / "dvc.lock").read_text()) == yaml.safe_load((sequential / "dvc.lock").read_text())
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=concurrent, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout

    times = _times(concurrent)
    assert all(times["a"][1] <= times[s][0] for s in ("b", "c", "f_one", "f_two"))  # dependencies first
    assert max(times["b"][1], times["c"][1]) <= times["d"][0]
    overlaps = [(x, y) for x in times for y in times if x < y
                and times[x][0] < times[y][1] and times[y][0] < times[x][1]]
    assert overlaps, f"nothing ran at the same time: {times}"
    assert max(sum(s <= t < e for s, e in times.values()) for t, _ in times.values()) <= 3  # --jobs 3 at most

    assert plan(concurrent).order == ()  # nothing left to run
    params = yaml.safe_load((concurrent / "params.yaml").read_text())
    params["study"]["name"] = "renamed"
    (concurrent / "params.yaml").write_text(yaml.safe_dump(params))
    assert plan(concurrent).order == ("e",)  # a param change reruns exactly its stage
    (concurrent / "out" / "a.txt").write_text("tampered")
    assert set(plan(concurrent).order) == {"a", "b", "c", "d", "e", "f@one", "f@two"}
    assert plan(concurrent).needs["d"] == {"b", "c"}


def test_a_failed_stage_stops_new_launches_and_is_named(tmp_path: Path) -> None:
    repo = _git_dvc_repo(tmp_path / "repo", _pipeline(fail="c"))
    done = _cli(repo, "--jobs", "2", "d")  # a target: d and what it depends on (a, b, c), not e or f
    assert done.returncode == 2, done.stdout + done.stderr
    assert "stage 'c' failed (exit code" in done.stderr and "c broke" in done.stderr
    assert "1 stage(s) not started: d" in done.stderr
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b"}  # b, running beside c, finished and was recorded
    assert not (repo / "out" / "d.txt").exists()


def test_a_busy_dvc_lock_is_waited_for_not_reported(tmp_path: Path) -> None:
    import zc.lockfile

    repo = _git_dvc_repo(tmp_path / "repo", _pipeline(seconds=0.2))
    held = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))  # another dvc process holds the repo
    try:
        child = subprocess.Popen([str(BIN / "transferbench"), "repro", "--jobs", "2", "a"], cwd=repo, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
        time.sleep(5)  # longer than DVC's own 3 s of retries
        assert child.poll() is None, child.stdout.read() if child.stdout else ""
    finally:
        held.close()
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output
    assert (repo / "out" / "a.txt").read_text() == "a"


def test_an_interrupt_stops_every_running_stage(tmp_path: Path) -> None:
    repo = _git_dvc_repo(tmp_path / "repo", _pipeline(seconds=60))
    child = subprocess.Popen([str(BIN / "transferbench"), "repro", "--jobs", "2"], cwd=repo, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    deadline = time.monotonic() + 60
    while not ((repo.parent / "times.log").exists() and "a start" in (repo.parent / "times.log").read_text()):
        assert time.monotonic() < deadline and child.poll() is None, "stage a never started"
        time.sleep(0.2)
    # the runner's tree: each stage's `dvc repro --single-item` and its command, in process groups of their own
    tree = psutil.Process(child.pid).children(recursive=True)
    assert any("stage.py" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
    os.kill(child.pid, signal.SIGTERM)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, output
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert not (repo / "dvc.lock").exists()  # the interrupted stage recorded nothing
    done = _cli(repo, "--dry-run")  # nothing half-recorded: a rerun plans the whole pipeline again
    assert "7 stage(s) to run" in done.stdout, done.stdout + done.stderr


def test_runner_rejects_no_jobs() -> None:
    with pytest.raises(Exception, match="--jobs must be at least 1"):
        Runner(jobs=0)


def test_stage_resources_reserve_a_fine_tunes_worker_only_in_local_mode() -> None:
    assert stage_resources("finetune@covid_geo-vit", local_mode=True, cpus_per_worker=4.0, use_gpu=True) == \
        {"num_cpus": 4.0, "num_gpus": 1}
    assert stage_resources("finetune_multitask@x-y", local_mode=False, cpus_per_worker=4.0, use_gpu=True) == \
        {"num_cpus": 0}  # Ray Train's placement group reserves the workers
    assert stage_resources("split@covid_geo", local_mode=True, cpus_per_worker=4.0, use_gpu=True) == {"num_cpus": 1}


def test_failure_message_names_the_stage() -> None:
    error = StageFailed([("finetune@t-b", 1, ["boom"])], not_started=["compare"])
    assert "stage 'finetune@t-b' failed (exit code 1)" in str(error) and "compare" in str(error)


@pytest.mark.slow
def test_on_a_ray_cluster_each_stage_reserves_its_resources(tmp_path: Path) -> None:
    """With $RAY_ADDRESS, stages are Ray tasks that reserve a CPU each (not fine-tunes): a 2-CPU cluster runs
    at most 2 at once although --jobs allows 3, and the lock is what a sequential dvc repro writes."""
    from transferbench.engine.cluster import RayCluster

    sequential = _git_dvc_repo(tmp_path / "seq" / "repo", _pipeline())
    subprocess.run([str(BIN / "dvc"), "repro"], cwd=sequential, check=True, capture_output=True)
    repo = _git_dvc_repo(tmp_path / "con" / "repo", _pipeline())
    cluster = RayCluster(tmp_path / "ray-logs")
    try:
        cluster.start([2])
        done = subprocess.run([str(BIN / "transferbench"), "repro", "--jobs", "3"], cwd=repo, env=cluster.env,
                              text=True, capture_output=True, timeout=600)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert yaml.safe_load((repo / "dvc.lock").read_text()) == yaml.safe_load((sequential / "dvc.lock").read_text())
    times = _times(repo)
    assert max(sum(s <= t < e for s, e in times.values()) for t, _ in times.values()) == 2
