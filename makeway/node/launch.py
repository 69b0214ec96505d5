"""Start a node as a child process and wait until it serves; used by the demo, benchmarks and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence

from makeway.store import sqlite_path
from makeway.store.wakeup import wakeup_dir


class NodeProcess:
    """A `makeway node` child process."""

    def __init__(self, app_spec: str, store_url: str, args: Sequence[str] = (), *,
                 log: IO | None = None, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None):
        self.store_url = store_url
        self.db_path = sqlite_path(store_url)
        # -P keeps the working directory off sys.path: a folder named "makeway"
        # there (a clone, say) would otherwise shadow an editable install.
        command = [sys.executable, "-P", "-m", "makeway", "node", "--app", app_spec, "--store", store_url, *args]
        self.process = subprocess.Popen(
            command, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the node listens for wake-ups (all its workers are up)."""
        deadline = time.monotonic() + timeout_s
        directory = wakeup_dir(self.db_path)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with code {self.process.returncode} before it was ready")
            if directory.is_dir() and any(directory.glob(f"node-{self.pid}-*.sock")):
                return
            time.sleep(0.02)
        raise TimeoutError(f"node pid={self.pid} was not ready within {timeout_s} s")

    def stop(self, timeout_s: float = 30.0) -> int:
        """Send SIGTERM and wait for a clean exit; SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def store_url_for(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"
