"""One writer per run file: an exclusive ``flock`` on ``RUN.h5.lock``, held for the writer's whole life.

The OS drops the lock when its process dies, however it dies, so a dead writer's run resumes without
guesswork; a live one's is refused at once, naming its pid and host. The lock file also reserves a little disk
space that the writer frees after a disk-full error, so HDF5 can still flush and close the run file cleanly.
Readers never take it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from qkhooks.errors import QKHooksError
from qkhooks.store.format import lock_path

__all__ = ["WriterLock", "keep_out_of_forked_children", "forget_in_forked_children"]

RESERVE_BYTES = 1 << 20
"""Disk space the lock file holds for the writer's last flush and close after a disk-full error."""


_HELD: dict[int, tuple[int, int]] = {}
"""Descriptors this process writes through, with the (device, inode) they referred to when registered."""


def keep_out_of_forked_children(fd: int) -> None:
    """Forked children (DataLoader and decoding workers) must not keep ``fd`` open: the writer lock and HDF5's
    own lock on the run file are ``flock``s, held while any process has the descriptor open, so a child's
    inherited copy would stop this writer from reopening its own run (and keep a dead writer's lock alive)."""
    st = os.fstat(fd)
    _HELD[fd] = (st.st_dev, st.st_ino)


def forget_in_forked_children(fd: int) -> None:
    """Stop keeping ``fd`` out of forked children (called when it is closed: the same number, even on the same
    file, may next belong to a reader, which children must keep)."""
    _HELD.pop(fd, None)


def _drop_in_forked_child() -> None:
    """Point the registered descriptors that still name their file at /dev/null in a new child (never touching a
    descriptor number that has since been reused for another file)."""
    if not _HELD:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd, ident in _HELD.items():
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == ident:
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_forked_child)


class WriterLock:
    """Take the writer lock of ``run`` (refused with a :class:`QKHooksError` while another process holds it)."""

    def __init__(self, run: str | os.PathLike, reserve: int = 0):
        self.run = Path(run)
        self.path = lock_path(run)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise QKHooksError(
                    f"{self.run} is being written by another process ({owner}); wait for it to finish or stop it, "
                    "then run again (a dead writer's lock is released by the system)."
                ) from None
            try:  # the file we locked must still be the one at the path (its last holder unlinks it on release)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        keep_out_of_forked_children(fd)
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (note + "\n").encode(), 0)
        self._note_size = len(note) + 1
        if reserve:
            try:
                os.posix_fallocate(fd, self._note_size, reserve)
            except OSError as exc:
                self.release()
                raise QKHooksError(f"cannot start writing {self.run}: {exc.strerror} (no room for even "
                                   f"{reserve >> 20} MiB); free space first.") from None

    def free_reserve(self) -> None:
        """Give the reserved space back to the file system (after a disk-full error)."""
        if self._fd is not None:
            os.ftruncate(self._fd, self._note_size)

    def release(self) -> None:
        if self._fd is None:
            return
        forget_in_forked_children(self._fd)
        self.path.unlink(missing_ok=True)  # unlinked while still held: a waiting process sees the change and retries
        os.close(self._fd)
        self._fd = None


def _owner(fd: int) -> str:
    try:
        note = json.loads(os.pread(fd, 512, 0).split(b"\n", 1)[0])
        return f"pid {note['pid']} on {note['host']}, since {note['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host not yet written"
