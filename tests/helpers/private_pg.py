"""A private PostgreSQL cluster on its own port, for tests that freeze it (SIGSTOP/SIGCONT).

The shared server on :5432 must never be frozen, so these tests ``initdb`` a throw-away
cluster into a temporary directory and run the ``postgres`` binary directly. As root the
cluster runs as the ``postgres`` user (``initdb`` refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.helpers.server import free_port


def pg_bin_dir() -> Path | None:
    """The newest installed PostgreSQL bin directory with ``initdb`` and ``postgres``."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0)
    for d in reversed(candidates):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "postgres").exists() else None


def _children(pid: int) -> list[int]:
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "(comm)": state, ppid, …
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


class PrivateCluster:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="skqk-pg-"))
        self.data = self.root / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen: list[int] = []
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as "postgres"
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> PrivateCluster:
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync", "-E", "UTF8"], check=True, capture_output=True,
                       **self._as)
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=40", "-c", "shared_buffers=16MB"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                                connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private postgres did not start:\n{self.log()}") from None
                time.sleep(0.2)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "postgres.log").read_text(errors="replace")[-4000:]
        return ""

    def freeze(self) -> list[int]:
        """SIGSTOP the postmaster, then every backend it forked (until no new one shows up)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        stopped = [self.proc.pid]
        while True:
            new = [pid for pid in _children(self.proc.pid) if pid not in stopped]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped += new
        self.frozen = stopped
        return stopped

    def thaw(self) -> None:
        for pid in reversed(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def stop(self) -> None:
        self.thaw()
        backends = _children(self.proc.pid) if self.proc is not None else []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: a throw-away cluster
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in backends:  # normally gone with the postmaster already
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
