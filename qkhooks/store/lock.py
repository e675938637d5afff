"""One writer per run file: an exclusive ``flock`` on ``RUN.h5.lock``, held for the writer's whole life, plus an
exclusive lock on the run file itself.

The lock file sits beside the run's real path (symlinks resolved), so two names of the file through a symlink
share it. A hard link is another name of the same inode with no common path: the writer also takes an open file
description lock (``F_OFD_SETLK``, Linux) on the run file itself, keyed by the file, not its name, so a second
writer through any name of the same file is refused. (An OFD lock and HDF5's own ``flock`` do not interact on a
local file system, so readers and HDF5 are unaffected.) Where OFD locks do not exist, the lock file alone
guards, and only the file's real path.

The OS drops both when their process dies, however it dies, so a dead writer's run resumes without
guesswork; a live one's is refused at once, naming its pid and host. The lock file also reserves a little disk
space that the writer frees after a disk-full error, so HDF5 can still flush and close the run file cleanly.
Readers never take either.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import shutil
import struct
from pathlib import Path

from qkhooks.errors import QKHooksError
from qkhooks.store.format import lock_path

__all__ = ["WriterLock", "keep_out_of_forked_children", "forget_in_forked_children", "writer_alive", "short_of_room"]

RESERVE_BYTES = 1 << 20
"""Disk space the lock file holds for the writer's last flush and close after a disk-full error."""


def out_of_room(exc: BaseException) -> str | None:
    """Which limit a failed write met: ``"disk"`` (no space left), ``"quota"`` (the user's disk quota, which the
    free-space check cannot see) or ``"size"`` (the largest file this process or file system may write: ``ulimit -f``,
    FAT32's 4 GiB); None for any other failure. HDF5's own errors carry the errno in their text."""
    for room, code in (("disk", errno.ENOSPC), ("quota", errno.EDQUOT), ("size", errno.EFBIG)):
        if (isinstance(exc, OSError) and exc.errno == code) or f"errno = {code}," in str(exc):
            return room
    return None


def short_of_room(folder: str | os.PathLike, nbytes: int, spare: int) -> int | None:
    """The free bytes in ``folder`` where they are fewer than ``nbytes`` (the next write) plus ``spare`` (HDF5's
    metadata and the close), else None. A copy that writes a file whole (``merge --copy``, ``repair``) checks its room
    once before it starts and asks this before each large write (up to 64 MiB), so a disk that another program fills
    meanwhile stops it before HDF5 meets the full disk (where it fails while closing, and a process died without a
    word): one ``statfs``, a few microseconds against the write."""
    free = shutil.disk_usage(folder).free
    return free if free < nbytes + spare else None


ROOM = {"disk": ("disk full", "free space"),
        "quota": ("disk quota exceeded", "free space within your quota (or have it raised)"),
        "size": ("file size limit reached", "raise the limit on file size (`ulimit -f`; where the file system has a "
                 "largest file, such as FAT32's 4 GiB, write the run to another)")}
"""What a write that ran out of room says, and its fix."""


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


_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37 if os.uname().sysname == "Linux" else None)
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36 if os.uname().sysname == "Linux" else None)
_FLOCK = "hhqqi"  # struct flock: short l_type, l_whence, off_t l_start, l_len, pid_t l_pid (0 for OFD locks)


def writer_alive(run: str | os.PathLike) -> bool | None:
    """Whether a live writer holds the lock on the run file itself (:meth:`WriterLock.hold_run`), asked without taking
    any lock; None where that cannot be told (no OFD locks, a file that does not open)."""
    if _OFD_GETLK is None:
        return None
    try:
        fd = os.open(run, os.O_RDONLY)
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, _OFD_GETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0) + bytes(8))
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack_from(_FLOCK, answer)[0] != fcntl.F_UNLCK


def _lock_file_itself(fd: int) -> bool:
    """An exclusive OFD write lock on all of ``fd``'s file, without waiting: False when another holds one.
    (True where OFD locks do not exist: nothing more can be checked there.)"""
    if _OFD_SETLK is None:
        return True
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0) + bytes(8)
    try:
        fcntl.fcntl(fd, _OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            return True  # no OFD locks here (an old kernel, a file system without them)
        raise
    return True


def _dangling_link(run: Path) -> str | None:
    """The missing target of ``run`` when it is a symlink to nothing (None otherwise)."""
    if run.is_symlink() and not run.exists():
        return os.path.realpath(run)
    return None


class WriterLock:
    """Take the writer lock of ``run`` (refused with a :class:`QKHooksError` while another process holds it).

    The lock file is named after the run's real path (symlinks resolved), and an existing run file is itself locked
    (see the module docstring), so a second writer through a symlink or a hard link is refused too. A run that is a
    symlink to a missing file is refused: writing it would replace the link by a new file and leave its target
    uncreated. Call :meth:`hold_run` again whenever a new file takes the run's name (a new run published).
    """

    def __init__(self, run: str | os.PathLike, reserve: int = 0):
        self.run = Path(run)
        target = _dangling_link(self.run)
        if target is not None:
            raise QKHooksError(f"{self.run} is a symlink to {target}, which does not exist; writing would replace the "
                               f"link by a new file and never create {target}. Give {target} as the output (or remove "
                               "the link).")
        self.path = lock_path(os.path.realpath(self.run))
        self._run_fd: int | None = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise QKHooksError(
                    f"cannot take the writer lock of {self.run}: {self.path} cannot be opened for writing "
                    f"({exc.strerror}). If it belongs to another user or no writer is running, remove it (or write the "
                    "run elsewhere), then run again.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner, ours = _owner(fd)
                os.close(fd)
                raise QKHooksError(
                    f"{self.run} is being written by this process ({owner}): another writer in it (a RunWriter, "
                    "record_dataset) has the run open; close that one first (leave its with block or call its "
                    "close()), then open the run again." if ours else
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
        try:
            self.hold_run()
        except BaseException:
            self.release()
            raise
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
                                   f"{reserve >> 20} MiB); {ROOM[out_of_room(exc) or 'disk'][1]} first.") from None

    def hold_run(self) -> None:
        """Lock the file now at the run's name (if any) itself, giving up the one locked before: refused while another
        writer, through any name of the file (a hard link), holds it."""
        try:
            fd = os.open(self.run, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        except OSError:  # not writable, a directory...: the writer refuses it by itself
            fd = None
        old, self._run_fd = self._run_fd, None
        if old is not None:
            forget_in_forked_children(old)
            os.close(old)
        if fd is None:
            return
        if not _lock_file_itself(fd):
            os.close(fd)
            raise QKHooksError(
                f"{self.run} is being written by another writer under another name of the same file (a hard link or "
                "symlink), in another process or in this one; wait for it to finish, or stop or close it, then run again.")
        self._run_fd = fd
        keep_out_of_forked_children(fd)

    def free_reserve(self) -> None:
        """Give the reserved space back to the file system (after a disk-full error)."""
        if self._fd is not None:
            os.ftruncate(self._fd, self._note_size)

    def release(self) -> None:
        if self._run_fd is not None:
            forget_in_forked_children(self._run_fd)
            os.close(self._run_fd)
            self._run_fd = None
        if self._fd is None:
            return
        forget_in_forked_children(self._fd)
        self.path.unlink(missing_ok=True)  # unlinked while still held: a waiting process sees the change and retries
        os.close(self._fd)
        self._fd = None


def _owner(fd: int) -> tuple[str, bool]:
    """Who holds the lock, as its note says, and whether that is this very process (a second writer opened in it)."""
    try:
        note = json.loads(os.pread(fd, 512, 0).split(b"\n", 1)[0])
        ours = note["pid"] == os.getpid() and note["host"] == socket.gethostname()
        return f"pid {note['pid']} on {note['host']}, since {note['since']}", ours
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host not yet written", False
