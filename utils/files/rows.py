"""Rows of the store's arrays read into memory, without mapping the file into the process.

``numpy.load(..., mmap_mode='r')`` gives a memory map of a whole ``.npy`` file. Slicing it leaves every page
read mapped into the process until the kernel reclaims it; reading the rows with positional file reads
instead keeps the pages in the page cache only, so a process's resident memory is the chunk it works on
rather than all of the file read so far. Anything that is not such a map is simply indexed.
"""
import mmap
import os

import numpy as np


def chunks(n, chunk_rows):
    """[(lo, hi), ...]: rows 0 .. n-1 in consecutive runs of at most ``chunk_rows``."""
    return [(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]


def _whole_file_map(array):
    """Whether ``array`` maps a whole C-ordered ``.npy`` file (as ``numpy.load(..., mmap_mode='r')`` returns it)."""
    return (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
            and bool(getattr(array, "filename", None)))


def read_rows(array, lo, hi):
    """Rows lo .. hi-1 of ``array`` as an in-memory numpy array, (hi - lo, ...): one plain file read for a
    whole-file memory map, a slice of anything else."""
    if _whole_file_map(array):
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        out = np.fromfile(array.filename, dtype=array.dtype, count=(hi - lo) * row,
                          offset=array.offset + lo * row * array.dtype.itemsize)
        return out.reshape((hi - lo,) + tuple(array.shape[1:]))
    return np.asarray(array[lo:hi])


def gather_rows(array, rows):
    """Rows ``rows`` (any order, repeats allowed) of ``array`` as an in-memory numpy array, (len(rows), ...):
    positional reads of a whole-file memory map, indexing of anything else."""
    rows = np.asarray(rows, dtype=np.int64)
    if not _whole_file_map(array):
        return np.asarray(array[rows])
    size = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=array.dtype)
    buf = out.reshape(len(rows), -1).view(np.uint8)
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for i, r in enumerate(rows.tolist()):
            got = os.preadv(fd, [buf[i]], array.offset + r * size)
            if got != size:
                raise OSError(f"short read of row {r} of {array.filename}")
    finally:
        os.close(fd)
    return out
