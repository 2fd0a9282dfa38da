"""Checksums that tie what a stage reads to what was written: sha256 of a file, and when to verify it.

A record is {"size": bytes, "sha256": hex} (nothing that differs between two runs writing the same bytes).
``problem(path, record, full, written_ns)`` says what is wrong with a file against its record, or None: the size
is always compared (a file cut short or grown); the sha256 is computed and compared when ``full``, and whenever
the file was modified after ``written_ns`` (the time of the record's own file: a file rewritten or replaced
after its record was written, or copied without keeping modification times). A record that is missing means
"unknown" (files written before records were kept), never damage.

sha256 runs at about 0.9 GB/s on one core of the 2-core AMD EPYC machine the docs' numbers come from (hashlib
with SHA-NI; docs/reference.md, "What is checked when files are read", gives the command).
"""
import hashlib
import os

BLOCK = 1 << 22


def sha256(path):
    """Hex sha256 of the bytes of ``path``, read in blocks of 4 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def record(path):
    """The record of ``path`` as it is now: {"size", "sha256"}."""
    return {"size": os.path.getsize(path), "sha256": sha256(path)}


def problem(path, rec, full=False, written_ns=None):
    """What is wrong with ``path`` against its record ``rec`` (None: unknown, nothing checked), or None.

    ``full``: compare the sha256 whatever the file's time; else only when the file was modified after
    ``written_ns`` (nanoseconds since the epoch; None: never)."""
    if not rec:
        return None
    st = os.stat(path)
    if rec.get("size") is not None and st.st_size != rec["size"]:
        return f"{st.st_size} bytes, {rec['size']} were written"
    newer = written_ns is not None and st.st_mtime_ns > written_ns
    if rec.get("sha256") and (full or newer) and sha256(path) != rec["sha256"]:
        return "its bytes differ from those written (sha256 mismatch)"
    return None
