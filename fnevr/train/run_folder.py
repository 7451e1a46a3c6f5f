"""A training run's folder: one writer at a time, never overwritten unasked, resumable after a crash.

Layout of ``OUT``: ``checkpoints/`` (``step-NNNNNNN.pt`` and ``latest.pt``), ``samples/``, ``log.csv``,
``tb/`` and, while a process trains into it, ``.lock`` (that process's PID and host).

* :meth:`RunFolder.acquire` takes the lock (``O_EXCL``). A lock whose process is gone (same host,
  dead PID) is stale: it is removed, with a message. Any other lock stops the new training.
* A folder that already holds a run is used only with ``resume`` (continue it) or ``overwrite``
  (delete that run's files first; other files are left alone).
* Partial files a killed process left (``.*.tmp`` in ``checkpoints/``, ``samples/``) are removed.
* :meth:`RunFolder.resume_candidates` lists checkpoints newest first, so a resume can fall back
  to an older complete one when the newest was cut short.
"""

import contextlib
import csv
import os
import re
import shutil
import socket
from pathlib import Path

from .._files import atomic_path

RUN_ENTRIES = ("checkpoints", "samples", "log.csv", "tb")
LOCK = ".lock"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, holds a run, nothing to resume)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunFolder:
    """``OUT`` of one training process (rank 0 under DDP); see the module doc."""

    def __init__(self, out):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.lock = self.out / LOCK
        self.locked = False
        self._created = False

    # --- the lock -------------------------------------------------------------------------------

    def acquire(self) -> list[str]:
        """Take the lock; returns messages about what was done (a stale lock removed)."""
        if self.out.exists() and not self.out.is_dir():
            raise RunFolderError(f"run folder {self.out} is a file, not a folder")
        self._created = self._created or not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        notes = []
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # stale: its process is gone
                    notes.append(f"removed a stale lock {self.lock} (its process is gone)")
                    self.lock.unlink(missing_ok=True)
                    continue
                pid, host = holder
                raise RunFolderError(
                    f"{self.out} is in use: process {pid} on {host} is training into it "
                    f"(lock file {self.lock}); if that process is gone, delete the lock file"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.locked = True
            return notes
        raise RunFolderError(f"could not take the lock {self.lock}: another process keeps creating it")

    def _holder(self):
        """``(pid, host)`` of a live lock holder, ``None`` for a stale lock."""
        try:
            pid, host = self.lock.read_text().split()
            pid = int(pid)
        except (OSError, ValueError):  # being written right now, or garbage: treat as held
            return ("?", "?") if self.lock.exists() else None
        if host == socket.gethostname() and not _pid_alive(pid):
            return None
        return pid, host

    def release(self):
        """Drop the lock; a folder this process created and left empty is removed again."""
        if self.locked:
            self.locked = False
            with contextlib.suppress(FileNotFoundError):
                self.lock.unlink()
            if self._created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only when empty

    # --- what is in it ----------------------------------------------------------------------------

    def holds_run(self) -> bool:
        return any((self.out / name).exists() for name in RUN_ENTRIES)

    def clear(self) -> list[str]:
        """Delete the run's own entries (not other files); returns what was removed."""
        removed = []
        for name in RUN_ENTRIES:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        return removed

    def remove_partial_files(self) -> list[Path]:
        """Remove the temporary files of writes that never finished (the lock is held, so no other
        process is writing them)."""
        stale = [
            p
            for folder in (self.checkpoints, self.out / "samples", self.out)
            if folder.is_dir()
            for p in folder.iterdir()
            if p.name.startswith(".") and ".tmp" in p.name and p.is_file()
        ]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def resume_candidates(self) -> list[tuple[int | None, Path]]:
        """``(None, latest.pt)``, then ``(N, step-N.pt)`` by decreasing N (the caller reads
        ``latest.pt``'s step and prefers a step file newer than it: a crash between the two writes
        leaves one)."""
        found = []
        if self.checkpoints.is_dir():
            found = sorted(
                ((int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _STEP_FILE.match(p.name))),
                reverse=True,
            )
        latest = self.checkpoints / "latest.pt"
        return ([(None, latest)] if latest.is_file() else []) + found

    def truncate_log(self, step: int) -> int:
        """Drop ``log.csv`` rows after ``step`` (a resumed run logs them again); returns how many."""
        path = self.out / "log.csv"
        if not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
        if header is None or "step" not in header:
            return 0
        at = header.index("step")
        kept = [r for r in rows if len(r) > at and r[at].isdigit() and int(r[at]) <= step]
        if len(kept) == len(rows):
            return 0
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(kept)
        return len(rows) - len(kept)
