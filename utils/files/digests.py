"""Checksums that tie what a stage reads to what was written: sha256 of a file, and when to verify it.

A record is {"size": bytes, "mtime_ns": the file's modification time when it was written, "sha256": hex}.
``problem(path, record, full)`` says what is wrong with a file against its record, or None: the size is always
compared (a file cut short or grown); the sha256 is computed and compared when ``full``, and also whenever the
file's modification time is not the recorded one (the file was rewritten, replaced or copied without keeping
times). A record that is missing means "unknown" (files written before records were kept), never damage.

sha256 runs at about 0.9 GB/s on one core of the 2-core AMD EPYC machine the docs' numbers come from (hashlib
with SHA-NI; see docs/reference.md, "What is checked when files are read").
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
    """The record of ``path`` as it is now: {"size", "mtime_ns", "sha256"}."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256(path)}


def problem(path, rec, full=False):
    """What is wrong with ``path`` against its record ``rec`` (None: unknown, nothing checked), or None.

    ``full``: compare the sha256 even when the size and modification time are the recorded ones."""
    if not rec:
        return None
    st = os.stat(path)
    if rec.get("size") is not None and st.st_size != rec["size"]:
        return f"{st.st_size} bytes, {rec['size']} were written"
    if rec.get("sha256") and (full or st.st_mtime_ns != rec.get("mtime_ns")):
        if sha256(path) != rec["sha256"]:
            return "its bytes differ from those written (sha256 mismatch)"
    return None
