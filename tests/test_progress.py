"""Progress bars draw in a terminal and stay out of piped output (CI, ``dvc repro`` logs).

A real ``transferbench fetch`` (the COVID-19 mirror: ~700 files copied and checksummed) runs twice:
under a pseudo-terminal, where its bars must draw, and with plain pipes, where stderr and stdout
must hold lines only. The wrapper's own rules (terminal check, ``$TRANSFERBENCH_PROGRESS``, bytes
with speed) are unit-tested beside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from transferbench.data.fetch import RemoteFile, obtain
from transferbench.progress import PROGRESS_ENV, enabled, progress

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("TRANSFERBENCH_DATA_MIRROR", REPO.parent / "shared" / "datasets"))
TRANSFERBENCH = Path(sys.executable).with_name("transferbench")
BAR = "%|"  # tqdm's bar between the percentage and the counts


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def covid_mirror() -> Path:
    if not (MIRROR / "covid-chestxray" / "SHA256SUMS").is_file():
        pytest.skip(f"COVID-19 mirror not found at {MIRROR / 'covid-chestxray'} (set TRANSFERBENCH_DATA_MIRROR)")
    return MIRROR


def _env(mirror: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    env["TRANSFERBENCH_DATA_MIRROR"] = str(mirror)
    return env


def _fetch_in_terminal(cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """``transferbench fetch covid-chestxray`` with stdin, stdout and stderr on a pseudo-terminal (120 columns)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    child = subprocess.Popen([str(TRANSFERBENCH), "fetch", "covid-chestxray"], cwd=cwd, env=env,
                             stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return child.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_fetch_draws_bars_in_a_terminal_and_none_in_piped_output(tmp_path, covid_mirror) -> None:
    env = _env(covid_mirror)
    for run in ("tty", "pipe"):
        (tmp_path / run).mkdir()
        shutil.copy(REPO / "params.yaml", tmp_path / run / "params.yaml")

    code, shown = _fetch_in_terminal(tmp_path / "tty", env)
    assert code == 0, shown[-3000:]
    assert "covid-chestxray: ok" in shown
    assert BAR in shown and "file/s" in shown and "\r" in shown, shown[-3000:]
    assert "checksum" in shown  # the checksum verification's bar

    piped = subprocess.run([str(TRANSFERBENCH), "fetch", "covid-chestxray"], cwd=tmp_path / "pipe", env=env,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout == "covid-chestxray: ok (data/raw/covid-chestxray)\n"
    for output in (piped.stdout, piped.stderr):
        assert "\r" not in output and BAR not in output and "file/s" not in output, output[-3000:]
    assert (tmp_path / "pipe/data/raw/covid-chestxray/SHA256SUMS").is_file()


def test_bars_draw_on_a_terminal_only_unless_forced(monkeypatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    terminal, pipe = _Terminal(), io.StringIO()
    assert enabled(terminal) and not enabled(pipe)
    for stream in (terminal, pipe):
        for _ in progress(range(3), desc="steps", file=stream):
            pass
    assert BAR in terminal.getvalue() and "\r" in terminal.getvalue()
    assert pipe.getvalue() == ""

    quiet = _Terminal()
    for _ in progress(range(3), desc="steps", file=quiet, disable=True):  # e.g. a rank other than 0
        pass
    assert quiet.getvalue() == ""

    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not enabled(terminal)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert enabled(pipe)


def test_a_download_counts_bytes_with_its_speed(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")  # capsys's stderr is no terminal
    source = tmp_path / "upstream.bin"
    source.write_bytes(os.urandom(3 << 20))
    remote = RemoteFile(source.as_uri(), "upstream.bin", "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest())
    target = obtain(remote, tmp_path / "dest", dataset="demo", mirror=None)
    assert target.read_bytes() == source.read_bytes()
    shown = capsys.readouterr().err
    # in bytes, scaled, out of the Content-Length, with the speed (B/s)
    assert "download upstream.bin" in shown and "/3.00M [" in shown and "B/s]" in shown, shown
    assert "checksum upstream.bin" in shown
