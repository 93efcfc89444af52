"""Real services for the scale-out tests, started and stopped by the tests themselves.

(The multi-node Ray cluster is ``transferbench.engine.cluster.RayCluster``, which ``transferbench
with-ray`` also uses.)

- ``Postgres``: a throw-away PostgreSQL server (Debian's ``postgresql`` package: ``initdb`` +
  ``pg_ctl``) in a temporary data directory, listening on 127.0.0.1 only, trust auth for
  one user. As root it runs as the ``postgres`` system user (PostgreSQL refuses root).
- ``MlflowServer``: ``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store and
  ``--serve-artifacts`` (clients read and write artifacts through the server); can be
  stopped and started again on the same port, to test client retries.

Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from transferbench.engine.cluster import BIN, free_port, stop_group, wait_until


# --------------------------------------------------------------------------- PostgreSQL
def postgres_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl: $PG_BINDIR, PATH, or Debian's /usr/lib/postgresql/<v>/bin."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


class Postgres:
    user = "transferbench"

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql); "
                               ".ci/run installs it")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="tb-pg-"))  # not under pytest's 0700 tmp: postgres reads it
        self.data = self.root / "data"
        self.port = free_port()
        self._as = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> str:
        done = subprocess.run([*self._as, *args], capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start(self) -> Postgres:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg2 driver)."""
        self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow server
class MlflowServer:
    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180) -> MlflowServer:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", self.artifacts.as_uri(), "--serve-artifacts",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.healthy, timeout=timeout, what=f"mlflow server on {self.uri}", process=self.process,
                   log=self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None
