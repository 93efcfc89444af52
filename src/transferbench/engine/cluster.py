"""A Ray cluster of ``ray start`` nodes on this machine, for one command's lifetime.

``transferbench with-ray -- dvc repro`` starts a head node, runs the command with
``RAY_ADDRESS`` pointing at it, then stops the node. Every ``transferbench finetune`` stage
then joins that one cluster instead of starting (and tearing down) a Ray instance of its
own. If a cluster is already configured (``ray.address`` or ``$RAY_ADDRESS``), the command
just runs on it; if no stage needs one (``ray.num_workers: 0``, Ray Train local mode), no
head is started.

Interrupts: the command runs in a process group of its own. SIGINT, SIGTERM or SIGHUP to
``with-ray`` (Ctrl-C, or a signal to ``make repro``'s group) is passed on to that group as
SIGINT (Python programs such as DVC and the stages unwind and close their runs), then
SIGTERM and SIGKILL if it lingers; then the cluster is stopped, its Ray workers included, and
``with-ray`` exits 128 + the signal's number.

Nodes are started with ``ray start --block`` in their own process group and stopped by
signalling that group: ``ray stop`` would stop every Ray cluster on the machine. Ray 2.60
clusters use token authentication: the token is a fresh file under the cluster's temporary
directory, handed to clients through ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN_PATH``.

Node addresses are loopback: the head is 127.0.0.2, further nodes 127.0.0.3, 127.0.0.4, ...
(Ray replaces 127.0.0.1 itself by the machine's routable IP, but not the rest of 127/8), so
the nodes and their clients talk over loopback, like separate hosts. Ray's servers still
listen on all interfaces (Ray has no bind-address setting); the token keeps other hosts out.

The tests build multi-node clusters from the same class (``add_node``, ``kill_node``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from transferbench.errors import TransferbenchError

BIN = Path(sys.executable).parent
HEAD_IP = "127.0.0.2"
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def configured_address(params_address: str | None) -> str | None:
    """The cluster to join: ``ray.address`` from params, else ``$RAY_ADDRESS``; None: none configured."""
    return params_address or os.environ.get(RAY_ADDRESS_ENV) or None


# Ray Train 2.60 starts a detached PlacementGroupCleaner per run, which asks Ray's State API every
# second whether the run's controller is still alive, to free its placement group if it died
# without a shutdown. The State API is served by Ray's dashboard; without it (transferbench's
# clusters run none: ``ray[train]`` does not install it) every question fails and the cleaner logs
# the same warning each second of the run (282 lines in one ``make repro``).
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_WARNING = "Failed to query Ray Train Controller actor state"


class _FirstOnly(logging.Filter):
    """Passes ``CLEANER_WARNING`` once per process, saying why its repeats are dropped; passes all else."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(CLEANER_WARNING):
            return True
        if self.shown:
            return False
        self.shown = True
        record.msg, record.args = (f"{message} [transferbench: shown once per run. Ray's State API is served by "
                                   "the dashboard, which this cluster does not run, so the cleaner cannot tell "
                                   "whether the controller died: a controller killed without a shutdown leaves "
                                   "its placement group until the cluster stops]"), ()
        return True


def quiet_placement_group_cleaner() -> None:
    """Ray worker-process setup hook (``RUNTIME_ENV``): the cleaner's failing check is logged once, not every second."""
    logging.getLogger(CLEANER_LOGGER).addFilter(_FirstOnly())


# The runtime environment of every Ray job transferbench starts (Ray Train's actors inherit it).
RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.quiet_placement_group_cleaner"}


def connect(address: str | None, **options: Any) -> None:
    """Join the cluster at ``address`` (None: ``$RAY_ADDRESS``, else a local instance) unless joined already.

    ``options``: more ``ray.init`` arguments (``num_cpus`` of a local instance, for the tests and benchmarks).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=True, logging_level="WARNING", runtime_env=RUNTIME_ENV,
                 **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``check`` until true; fail naming ``what`` (with the log's tail) on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TransferbenchError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_all(processes: Sequence[Any]) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def stop_group(process: subprocess.Popen, *, grace: float = 20.0) -> None:
    """SIGTERM a process group started with start_new_session; SIGKILL what is left after ``grace``."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class RayCluster:
    """``ray start`` nodes on this machine; ``env`` is what a client (driver) needs to join."""

    def __init__(self, log_dir: str | Path, *, object_store_bytes: int = 150_000_000,
                 fast_failure_detection: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tbray-"))  # Ray's socket paths must stay short
        self.logs = Path(log_dir)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self._started = 0  # nodes ever started: node k gets 127.0.0.(2 + k)
        token = self.root / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        if fast_failure_detection:  # a lost node is noticed in ~3 s instead of ~30 s
            self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                            RAY_health_check_failure_threshold="3")
        self.object_store_bytes = object_store_bytes
        self.nodes: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        ip = f"127.0.0.{2 + self._started}"
        self._started += 1
        with (self.logs / f"ray-{name}.log").open("a") as log:
            process = subprocess.Popen(
                [str(BIN / "ray"), "start", *args, f"--node-ip-address={ip}", "--object-store-memory",
                 str(self.object_store_bytes), "--disable-usage-stats", "--block"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        reap_orphaned_group(process.pid, signum=signal.SIGTERM, grace=20.0)  # `ray start` stops its daemons
        self.nodes.append(process)
        return process

    def start(self, cpus: Sequence[int]) -> RayCluster:
        """A head node with ``cpus[0]`` CPUs and one further node per further entry."""
        head = self._start(["--head", f"--port={self.port}", f"--num-cpus={cpus[0]}", "--include-dashboard=false",
                            f"--temp-dir={self.root / 'ray'}"], "head")
        wait_until(lambda: len(self.alive_nodes()) == 1, timeout=120, what="the Ray head node", process=head,
                   log=self.logs / "ray-head.log")
        for i, n in enumerate(cpus[1:], start=1):
            self.add_node(n, name=f"node{i}")
        return self

    def add_node(self, cpus: int, *, name: str) -> subprocess.Popen:
        before = len(self.alive_nodes())
        node = self._start([f"--address={self.address}", f"--num-cpus={cpus}"], name)
        wait_until(lambda: len(self.alive_nodes()) == before + 1, timeout=120, what=f"Ray node {name}", process=node,
                   log=self.logs / f"ray-{name}.log")
        return node

    def alive_nodes(self) -> list[dict]:
        """[{node_id, cpus}] of the live nodes, asked of the cluster by a short-lived client."""
        code = ("import json, ray; ray.init(logging_level='ERROR'); "
                "print(json.dumps([{'node_id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
                "for n in ray.nodes() if n['Alive']]))")
        try:
            done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                  timeout=120)
        except subprocess.TimeoutExpired:
            return []
        if done.returncode != 0:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of node ``index`` (its raylet, object store and workers) at once: a lost machine.

        Ray starts each worker in a process group of its own, so signalling the node's group alone
        would leave its workers running (and training) until they notice their raylet is gone.
        """
        import psutil

        node = self.nodes.pop(index)
        tree = psutil.Process(node.pid).children(recursive=True)
        os.killpg(node.pid, signal.SIGKILL)
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait(timeout=10)

    def stop(self) -> None:
        """Stop every node, and every process they started: Ray starts its workers (and their loader
        processes) in process groups of their own, which signalling a node's group does not reach."""
        for node in reversed(self.nodes):  # further nodes first, the head last
            tree = _descendants(node.pid)
            stop_group(node)
            _kill_all(tree)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _on_interrupt(handler: Any) -> Iterator[None]:
    """``handler`` for SIGINT, SIGTERM and SIGHUP inside the block; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in INTERRUPTS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def run_interruptible(command: Sequence[str], *, env: dict[str, str] | None = None, grace: float = 30.0) -> int:
    """Run ``command`` in a process group of its own; an interrupt of this process stops that whole group.

    On SIGINT/SIGTERM/SIGHUP the group gets SIGINT, SIGTERM after ``grace`` seconds, then SIGKILL,
    and the return value is 128 + the signal's number; otherwise it is the command's exit code.
    """
    received: list[int] = []
    with _on_interrupt(lambda signum, frame: received.append(signum)):
        child = subprocess.Popen(list(command), env=env, process_group=0)
        reap_orphaned_group(child.pid, signum=signal.SIGINT, grace=grace)  # this process SIGKILLed: still stopped
        escalation = [(0.0, signal.SIGINT), (grace, signal.SIGTERM), (2 * grace, signal.SIGKILL)]
        first: float | None = None
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if received:
                first = time.monotonic() if first is None else first
                while escalation and time.monotonic() - first >= escalation[0][0]:
                    signal_group(child.pid, escalation.pop(0)[1])
        if received:  # anything of the group that outlived its leader
            signal_group(child.pid, signal.SIGKILL)
    return 128 + received[0] if received else code


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet waited for, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphaned_group(pgid: int, *, signum: int, grace: float) -> None:
    """Stop process group ``pgid`` (``signum``, SIGKILL after ``grace`` s) should this process die first.

    A group started with ``start_new_session`` (a Ray node, the command of ``with-ray``, a stage of
    ``transferbench repro``) is out of reach of a signal to its starter's group, and a SIGKILLed starter
    cannot stop it: a watcher in a session of its own does, and otherwise ends with the group. Linux only
    (``/proc``).
    """
    code = f"from transferbench.engine.cluster import _reap; _reap({os.getpid()}, {pgid}, {int(signum)}, {grace})"
    subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reap(owner: int, pgid: int, signum: int, grace: float) -> None:
    """The watcher of ``reap_orphaned_group``: returns when the group ends, stopping it if ``owner`` ends first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the owner's to handle
    while _group_alive(pgid):
        if not _alive(owner):
            signal_group(pgid, signum)
            deadline = time.monotonic() + grace
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            signal_group(pgid, signal.SIGKILL)
            return
        time.sleep(0.5)


def signal_group(pgid: int, signum: int) -> None:
    """``signum`` to a process group; one that has already ended is not an error."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def run_with_cluster(command: Sequence[str], *, params_address: str | None, log_dir: str | Path,
                     needs_cluster: bool = True, cpus: int | None = None) -> int:
    """Run ``command`` against a Ray cluster: the configured one, else a head node started for it.

    ``needs_cluster`` False (every fine-tune in Ray Train local mode): no head node, the command just runs.
    """
    if configured_address(params_address):
        return run_interruptible(command)
    if not needs_cluster:
        print(f"transferbench: ray.num_workers is 0 (Ray Train local mode): no Ray head node for: "
              f"{' '.join(command)}", flush=True)
        return run_interruptible(command)
    cluster = RayCluster(log_dir)
    try:
        with _on_interrupt(_raise_interrupted):  # an interrupt while the head starts
            cluster.start([cpus or os.cpu_count() or 1])
        print(f"transferbench: Ray head node at {cluster.address} for: {' '.join(command)}", flush=True)
        return run_interruptible(command, env=cluster.env)
    except _Interrupted as stop:
        return 128 + stop.signum
    finally:
        with _on_interrupt(signal.SIG_IGN):  # the cluster is stopped whatever arrives meanwhile
            cluster.stop()
