"""Atomic file writes (write to a temporary name in the same folder, then rename into place) and locks.

A crash or Ctrl-C mid-write never leaves a half-written file under the final name, and a
file written by an earlier run stays intact until the new one is complete. ``FileLock`` keeps two
processes from writing the same files at once (an advisory POSIX lock, released when its holder
exits or is killed). The temporary name says which process wrote it, and a killed writer's is removed by the
next run that writes into the same folder (``leftovers``).

A full disk while writing is one line (``DiskFull``, a UserError): the temporary file is removed and every file
finished before stays as it was. Every JSON file is strict JSON (``strict_json``: no NaN or Infinity tokens;
a number that is not finite is written as null, with a ``<key>_reason`` beside it).
"""
import errno
import fcntl
import json
import math
import os
import socket
import tempfile
import time
from contextlib import contextmanager

from utils.files import leftovers
from utils.errors import UserError


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` says which ('pid 123 on host, since ...')."""

    def __init__(self, holder):
        super().__init__(holder)
        self.holder = holder


class FileLock:
    """An exclusive advisory lock on ``path`` (created if missing) for this process.

    A POSIX record lock (``fcntl.lockf``): it is released when the process ends however it ends (also on
    SIGKILL), it is not inherited by forked children (DataLoader workers), and it works on NFS. The file
    of a non-waiting lock holds the holder's pid and host, for the message another process gets (``LockHeld``).
    ``wait=True`` blocks until the lock is free instead of raising. Use as a context manager or ``release()``.
    """

    fd = None

    def __init__(self, path, wait=False):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise LockHeld(holder)
        if not wait:  # a lock that others are refused: say who holds it (a waiting lock's file stays empty)
            note = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, note.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the POSIX lock
            self.fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(e):
    """Whether exception ``e`` says the device is full: OSError ENOSPC / EDQUOT, or the RuntimeError torch.save
    raises when its stream fails (``basic_ios::clear: iostream error``; its writer names no reason)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and ("iostream error" in text or "No space left" in text
                                            or "file write failed" in text)


class DiskFull(UserError):
    """The device is full while ``path`` is written: one line naming it (the stage scripts print it and exit 2)."""

    def __init__(self, path):
        super().__init__(f"no space left on device writing {path}; free space and rerun: finished work is kept")
        self.path = path


@contextmanager
def atomic_path(path, durable=False):
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    ``durable``: the file's data and its new name are flushed to disk before returning (a marker that
    must survive a power cut). The temporary name is ``leftovers.temp_prefix`` + 8 random characters, held
    with a ``flock`` until the rename; the first write of this process into a folder removes the temporary
    files that killed writers left there (``leftovers.remove_stale``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    leftovers.sweep_once(folder)
    held, tmp = tempfile.mkstemp(prefix=leftovers.temp_prefix(os.path.basename(path)), dir=folder)
    leftovers.lock(held)  # held until the rename: the file's writer is alive
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise DiskFull(path) from None
            raise
        os.chmod(tmp, 0o666 & ~umask)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        os.close(held)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _finite(obj):
    """``obj`` with every float that is not finite replaced by None; in a dict, ``key: nan`` also gets
    ``key_reason`` (unless the dict has one) saying what the value was."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k] = _finite(v)
            if isinstance(v, float) and not math.isfinite(v) and f"{k}_reason" not in obj:
                out[f"{k}_reason"] = f"not a finite number ({v})"
        return out
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj, indent=1):
    """The text of ``obj`` as strict JSON (RFC 8259: no NaN or Infinity tokens): a float that is not finite is
    written as null, and in a dict with ``<key>_reason`` beside it (callers that know why a number is undefined,
    e.g. a mean over 0 images, put their own reason there first). Finite values are written as json.dumps
    writes them."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent=1):
    write_text(path, strict_json(obj, indent) + "\n")


def read_json(path, remedy=None):
    """The JSON value in ``path``; a file that is not complete JSON is a one-line UserError (``reading.Damaged``)
    naming it and ``remedy`` (what to do). NaN and Infinity tokens are read as older versions wrote them."""
    from utils.files import reading
    return reading.read_json(path, remedy)


def save_torch(path, obj):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_npy(path, array):
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path, arrays):
    """Save a dict of numpy arrays as an uncompressed ``.npz``, atomically and durably."""
    import numpy as np
    with atomic_path(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_figure(path, fig, **kwargs):
    """Save a matplotlib figure atomically (format taken from ``path``'s extension)."""
    ext = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext, **kwargs)
