"""Wake-up datagrams between processes that share one SQLite store.

Each listening process binds a Unix datagram socket in a directory derived
from the database path; a writer sends one empty datagram to every socket of
the kind it wants to wake. A datagram carries no data the receiver trusts: it
only says "look at the store now", so a lost one costs at most one poll
interval, never a job.

Sockets live under the temporary directory rather than beside the database
because a Unix socket path is limited to 107 bytes.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import socket
import tempfile
from pathlib import Path

NODE = "node"
WAITER = "waiter"
# A datagram with this payload makes a node re-read cancel requests and
# pauses as well as the queue. Like any wake-up it is only a hint.
CONTROL_HINT = b"c"
_sequence = itertools.count()


def wakeup_dir(db_path: Path) -> Path:
    digest = hashlib.sha256(str(db_path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"makeway-{os.getuid()}-{digest}"


class Listener:
    """A bound datagram socket that wakes its owner; use `fileno()` with select."""

    def __init__(self, db_path: Path, kind: str):
        directory = wakeup_dir(db_path)
        directory.mkdir(mode=0o700, exist_ok=True)
        self.path = directory / f"{kind}-{os.getpid()}-{next(_sequence)}.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        if self.path.exists():
            self.path.unlink()
        self._socket.bind(str(self.path))

    def fileno(self) -> int:
        return self._socket.fileno()

    def drain(self) -> set[bytes]:
        """Read every pending datagram; return the set of payloads seen (b"" for plain wake-ups)."""
        payloads: set[bytes] = set()
        while True:
            try:
                payloads.add(self._socket.recv(64))
            except (BlockingIOError, InterruptedError):
                return payloads

    def close(self) -> None:
        self._socket.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def notify(db_path: Path, kind: str, payload: bytes = b"") -> int:
    """Send a wake-up to every listener of `kind`; return how many were reached.

    A socket file whose owner is gone refuses the datagram and is removed here.
    """
    directory = wakeup_dir(db_path)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    reached = 0
    try:
        for name in names:
            if not name.startswith(kind + "-"):
                continue
            path = directory / name
            try:
                sender.sendto(payload, str(path))
                reached += 1
            except (ConnectionRefusedError, FileNotFoundError):
                _remove_stale(path)
            except OSError as exc:
                # A full receive buffer means the listener has wake-ups pending already.
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                    raise
                reached += 1
    finally:
        sender.close()
    return reached


def _remove_stale(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
