"""One driver per study: an exclusive lock on the study folder that names its holder.

``ditscale run`` and ``resume`` hold ``driver.lock`` (``fcntl.flock``) for as long as they
drive the study. The kernel drops the lock when its process dies, however it dies, so a stale
lock of a killed driver is simply free again: the next driver takes it and rewrites the holder.
A second live driver gets a ConfigError naming the holder (host, pid, since when) and exits 2
before it touches anything. ``flock`` works across machines on NFSv4 (Linux maps it to a
byte-range lock there); object stores have no locks (see the storage section of the README).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dit.errors import ConfigError


def holder(path: Path) -> dict:
    """What the lock file says about its (last) holder; ``{}`` if unreadable."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


@contextmanager
def study_lock(path: Path, study: str) -> Iterator[None]:
    """Hold the study's driver lock for the ``with`` block, or refuse naming who holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = holder(path)
            raise ConfigError(
                f"study {study!r} is being run by another driver (pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, since {h.get('since', '?')}; lock {path}); wait for it to end, "
                "or stop it with `ditscale cancel`"
            ) from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
