"""``transferbench repro --jobs N``: the out-of-date stages of ``dvc.yaml``, up to N independent ones at once.

``dvc repro`` runs one stage at a time, and DVC has no ``--jobs`` for it (treeverse/dvc#10922
was closed). Its documented answer is separate ``dvc repro <stage>`` processes: DVC releases its
repository lock while a stage's command runs (``dvc.stage.run``'s ``unlocked_repo``), so those
processes overlap, and each records its stage in ``dvc.lock`` under the lock. This module is
the scheduler around that:

- **Plan.** DVC's own planning (``plan_repro`` on the active graph, frozen stages cut off, as
  ``dvc repro`` does) orders the stages; a stage is to run when ``stage.changed()`` or when a
  stage it depends on is to run. The plan is made once, under the repository lock.
- **Run.** Each stage runs as ``dvc --wait-for-lock repro --single-item <stage>``: DVC checks it
  again, runs it, and records its outputs, metrics and plots in ``dvc.lock`` exactly as a
  sequential ``dvc repro`` would. ``--wait-for-lock`` makes DVC wait for the repository lock
  rather than fail after 3 s; a lock error that still gets through (a stage's outputs busy in
  DVC's rwlock) is retried with back-off, never reported as a failure.
- **Resources.** Without a Ray cluster each stage is a local process with ``cores / N`` threads
  (``OMP_NUM_THREADS``), so N stages share the machine instead of oversubscribing it. With one
  (``ray.address`` / ``$RAY_ADDRESS``, e.g. under ``transferbench with-ray``), each stage is a Ray
  task that reserves its fine-tune's resources, so a cluster of K GPUs runs K one-GPU fine-tunes
  at once; the stage's command then runs on the node Ray picked, in the same directory, so every
  node must see the project at the same path (a shared filesystem), as ``ray.storage_path`` does.
- **Failure.** A failed stage stops new launches and lets the running ones finish; the exit code
  is non-zero and the error names each failed stage. An interrupt (SIGINT, SIGTERM) stops every
  running stage's process group, SIGINT first so DVC and the fine-tunes unwind and can resume.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferbench.engine.cluster import reap_orphaned_group, signal_group
from transferbench.errors import TransferbenchError

log = logging.getLogger(__name__)

# What DVC prints when it gives up on a lock another process holds (dvc.lock.FAILED_TO_LOCK_MESSAGE
# and dvc.rwlock's "is busy"): the stage did not fail, it did not get its turn.
LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class Plan:
    """The stages to run, dependencies first (``order``), and which of them each one waits for."""

    order: tuple[str, ...]
    needs: dict[str, frozenset[str]] = field(hash=False)
    up_to_date: int = 0


def plan(root: str | Path = ".", targets: Sequence[str] = ()) -> Plan:
    """What ``dvc repro [targets]`` would run, as stage names with their dependencies among them."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for delay in (*RETRY_DELAYS, None):  # another DVC process (a queued experiment, a stage ending) holds it
            try:
                repo.lock.lock()
                break
            except LockError:
                if delay is None:
                    raise TransferbenchError(f"{repo.lock.lockfile}: DVC's repository lock stayed busy for "
                                             f"{sum(RETRY_DELAYS):.0f} s; is another `dvc` running here?") from None
                time.sleep(delay)
        try:
            return _plan(repo, targets)
        finally:
            repo.lock.unlock()


def _plan(repo: Any, targets: Sequence[str]) -> Plan:
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    stages = collect_stages(repo, targets) if targets else None
    graph = get_active_graph(repo.index.graph)
    steps = plan_repro(graph, stages)
    to_run: dict[Any, frozenset[Any]] = {}
    for stage in steps:  # dependencies come first, so theirs are decided already
        upstream = frozenset(d for d in graph.successors(stage) if d in to_run)
        if upstream or stage.changed():
            to_run[stage] = upstream
    return Plan(order=tuple(_address(s) for s in to_run),
                needs={_address(s): frozenset(_address(d) for d in ups) for s, ups in to_run.items()},
                up_to_date=len(steps) - len(to_run))


def _address(stage: Any) -> str:
    """The stage as ``dvc repro`` addresses it from the repository's root (``stage.addressing`` is relative to
    the working directory): ``name`` in the root ``dvc.yaml``, ``path:name`` elsewhere, ``path`` for .dvc files."""
    name = getattr(stage, "name", None)
    if name is None:
        return stage.path_in_repo
    return name if stage.path_in_repo == "dvc.yaml" else f"{stage.path_in_repo}:{name}"


def stage_command(stage: str) -> list[str]:
    """DVC's own reproduction of one stage, waiting for the repository lock instead of failing."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]


def _lock_contention(output: str) -> bool:
    return any(marker in output for marker in LOCK_ERRORS)


@dataclass
class _Running:
    stage: str
    attempt: int
    process: subprocess.Popen | None = None  # local: the stage's process group
    ref: Any = None  # Ray: the task's ObjectRef
    tail: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None


class Runner:
    """Runs a ``Plan``: up to ``jobs`` stages at once, each as a local process or a Ray task.

    ``resources(stage)`` gives a stage's Ray reservation (``num_cpus``, ``num_gpus``); it is used only
    with a cluster (``ray_address``). ``emit`` receives each output line, prefixed with its stage.
    """

    def __init__(self, *, jobs: int, root: str | Path = ".", ray_address: str | None = None,
                 resources: Callable[[str], dict[str, float]] = lambda stage: {"num_cpus": 1},
                 emit: Callable[[str], None] = print, cores: int | None = None) -> None:
        if jobs < 1:
            raise TransferbenchError(f"--jobs must be at least 1, got {jobs}")
        self.jobs, self.root, self.ray_address = jobs, Path(root).resolve(), ray_address
        self.resources, self.emit = resources, emit
        self.threads = max(1, (cores or os.cpu_count() or 1) // jobs)
        self._lock = threading.Lock()

    # -- launching ---------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        threads = str(self.threads)
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}

    def _print(self, stage: str, line: str, tail: list[str]) -> None:
        with self._lock:
            self.emit(f"[{stage}] {line}")
        tail.append(line)
        del tail[:-200]

    def _launch(self, stage: str, attempt: int) -> _Running:
        running = _Running(stage, attempt)
        if self.ray_address:
            remote = _ray_stage_task().options(**self.resources(stage), name=f"dvc repro {stage}")
            running.ref = remote.remote(stage_command(stage), str(self.root), self._env())
            return running
        running.process = subprocess.Popen(stage_command(stage), cwd=self.root, env=self._env(), text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reap_orphaned_group(running.process.pid, signum=signal.SIGINT, grace=STOP_GRACE_S)

        def read() -> None:
            assert running.process is not None and running.process.stdout is not None
            for line in running.process.stdout:
                self._print(stage, line.rstrip("\n"), running.tail)

        running.reader = threading.Thread(target=read, daemon=True, name=f"output of {stage}")
        running.reader.start()
        return running

    def _finished(self, running: _Running) -> int | None:
        """The exit code of a finished stage, None while it runs."""
        if running.process is not None:
            code = running.process.poll()
            if code is not None and running.reader is not None:
                running.reader.join()
            return code
        import ray

        ready, _ = ray.wait([running.ref], timeout=0)
        if not ready:
            return None
        try:
            code, lines = ray.get(running.ref)
        except ray.exceptions.RayError as exc:  # its node or worker died: the stage failed, the others go on
            code, lines = 1, [f"the Ray task running the stage failed: {type(exc).__name__}: {exc}"]
        for line in lines:
            self._print(running.stage, line, running.tail)
        return code

    def _stop(self, runs: Iterable[_Running]) -> None:
        """SIGINT every running stage's process group (DVC and the fine-tunes unwind, close their MLflow runs
        and can resume), SIGKILL what is left after ``STOP_GRACE_S``."""
        runs = list(runs)
        refs = []
        for running in runs:
            if running.process is not None:
                signal_group(running.process.pid, signal.SIGINT)
            else:
                import ray

                ray.cancel(running.ref, force=False)  # KeyboardInterrupt in the task: it stops its group
                refs.append(running.ref)
        deadline = time.monotonic() + STOP_GRACE_S
        if refs:  # the tasks stop their stages' process groups; the cluster may be stopped right after us
            import ray

            ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 5)
        for running in runs:
            if running.process is None:
                continue
            try:
                running.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(running.process.pid, signal.SIGKILL)
                running.process.wait()

    # -- the schedule ------------------------------------------------------------------------
    def run(self, plan: Plan) -> int:
        """Run ``plan``; returns 0, or raises ``StageFailed`` naming the failed stages."""
        if self.ray_address:
            import ray

            from transferbench.engine.cluster import connect

            connect(self.ray_address)
            if not ray.is_initialized():  # pragma: no cover -- connect raises when it cannot
                raise TransferbenchError(f"cannot connect to the Ray cluster at {self.ray_address}")
        pending = list(plan.order)
        done: set[str] = set()
        failed: list[tuple[str, int, list[str]]] = []
        running: dict[str, _Running] = {}
        retry_at: dict[str, tuple[float, int]] = {}
        try:
            while pending or running:
                for stage, run in list(running.items()):
                    code = self._finished(run)
                    if code is None:
                        continue
                    del running[stage]
                    if code == 0:
                        done.add(stage)
                    elif _lock_contention("\n".join(run.tail)) and run.attempt < len(RETRY_DELAYS):
                        delay = RETRY_DELAYS[run.attempt]
                        self.emit(f"[{stage}] DVC's lock is busy; trying again in {delay:.0f} s")
                        retry_at[stage] = (time.monotonic() + delay, run.attempt + 1)
                        pending.insert(0, stage)
                    else:
                        failed.append((stage, code, run.tail))
                if failed and not running:
                    break
                now = time.monotonic()
                for stage in list(pending):
                    if failed or len(running) >= self.jobs:
                        break
                    if not plan.needs[stage] <= done or retry_at.get(stage, (0.0, 0))[0] > now:
                        continue
                    pending.remove(stage)
                    running[stage] = self._launch(stage, retry_at.pop(stage, (0.0, 0))[1])
                if pending and not running and not failed and not retry_at:
                    raise TransferbenchError(f"stages {pending} wait for stages that never ran")  # pragma: no cover
                time.sleep(0.1)
        except BaseException:
            self._stop(running.values())
            raise
        if failed:
            raise StageFailed(failed, not_started=pending)
        return 0


class StageFailed(TransferbenchError):
    """One or more stages exited non-zero; the others that could run did."""

    def __init__(self, failed: list[tuple[str, int, list[str]]], *, not_started: Sequence[str]) -> None:
        self.stages = [stage for stage, _, _ in failed]
        lines = [f"stage {stage!r} failed (exit code {code}); its last lines:\n    " + "\n    ".join(tail[-8:])
                 for stage, code, tail in failed]
        if not_started:
            lines.append(f"{len(not_started)} stage(s) not started: {', '.join(not_started[:8])}"
                         + (" ..." if len(not_started) > 8 else ""))
        super().__init__("\n".join(lines))


_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def _run_group(command: list[str], cwd: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """A stage's command in a process group of its own (on the Ray node); (exit code, its output lines).
    A cancellation (``ray.cancel``) stops the group as the local runner does: SIGINT, SIGKILL after the grace."""
    # A Ray worker ignores or blocks SIGINT, and both stay so across exec: without this reset DVC and the
    # fine-tune would never see the interrupt. (A preexec_fn is not safe in a process with threads.)
    command = [sys.executable, "-c", _DEFAULT_SIGINT, *command]
    process = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    reap_orphaned_group(process.pid, signum=signal.SIGINT, grace=STOP_GRACE_S)  # the Ray worker lost: still stopped
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while process.poll() is None:  # Python code runs every 0.1 s: ray.cancel's KeyboardInterrupt lands here
            time.sleep(0.1)
        reader.join()
        return process.returncode, lines
    except BaseException:  # ray.cancel raises TaskCancelledError (a KeyboardInterrupt elsewhere) here
        signal_group(process.pid, signal.SIGINT)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
        raise


_REMOTE: Any = None


def _ray_stage_task() -> Any:
    """``_run_group`` as a Ray remote function (made on first use: importing Ray costs ~0.6 s)."""
    global _REMOTE  # noqa: PLW0603 -- one remote function per process
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_retries=0)(_run_group)
    return _REMOTE


def stage_resources(stage: str, *, local_mode: bool, cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """A stage's Ray reservation. A fine-tune in local mode trains in the stage's own process: it reserves one
    worker's CPUs and, with ``use_gpu``, one GPU. With Ray Train workers, Ray Train reserves the workers'
    resources itself (a placement group), so the stage's driver reserves nothing. Other stages take a CPU."""
    if stage.split("@")[0] in ("finetune", "finetune_multitask", "sensitivity"):
        if not local_mode:
            return {"num_cpus": 0}
        return {"num_cpus": cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
    return {"num_cpus": 1}
