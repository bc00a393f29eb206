"""One writer per output folder: an advisory lock on ``OUT/.camfunc-run.lock``.

The lock is ``flock``'s, which the kernel drops when its process ends, however
it ends: a lock left by a killed run is no lock at all, and the next run takes
it. The file itself stays and names the process holding it, for the refusal
message. Under torchrun rank 0 holds it for the whole job.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".camfunc-run.lock"


class FolderLock:
    """``acquire()`` returns None once this process writes ``out``, or why it may not."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> str | None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open: the flock lives as long as the file)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _described(file.read())
            file.close()
            return (f"{self.path.parent} is being written by another camfunc run ({holder}); "
                    "wait for it to finish, or use another --out folder")
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        file.flush()
        self._file = file
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def _described(text: str) -> str:
    """The holder the lock file names: 'pid 123 on host, started ...'."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
