"""Atomic file writes: write to a temporary name in the same folder, then rename into place.

A crash or Ctrl-C mid-write never leaves a half-written file under the final name, and a
file written by an earlier run stays intact until the new one is complete.
"""
import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, obj, indent=1):
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(path, obj):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_npy(path, array):
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_figure(path, fig, **kwargs):
    """Save a matplotlib figure atomically (format taken from ``path``'s extension)."""
    ext = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=ext, **kwargs)
