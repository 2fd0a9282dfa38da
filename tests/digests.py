"""Checked-in digests of the files an older commit wrote, and today's files compared with them.

The byte-identity tests (tests/test_house_plan.py, tests/test_kway.py) once ran an older commit's code (``git
archive``) beside today's; now ``python -m tests.make_digests`` runs the older code once and keeps, per file, the
sha256 of what the comparison looks at (``comparable``), in ``tests/digests/COMMIT.json``. The tests run today's
code only and compare its files with those digests, in any clone, shallow or not.

What a digest covers (``comparable``): a file's bytes, with the folder the run wrote into written ``<root>``; for
JSON its content less what no two runs share (keys of times and process ids, ``VOLATILE_KEYS``; times in
strings, ``VOLATILE_TEXT``), keys sorted; for logs and reports the text less times and progress bars; for a
cached SAE (``.pt``) its tensors' bytes and its record less the training time. Where today's code may add JSON
keys (the demo's report and summaries gained keys after the older commit), a digest also keeps the file's key
tree (``key_tree``), and today's file is compared less the keys the older file lacked (``restricted``). Where a
file records the sha256 of another file that names the run's folder (stage 3 and 4's ``concepts_sha256``), only a
run in the same folder agrees: the generated case's digest keeps its folder (``root``), and the test runs there.

CPU convolutions round by their thread count and by the CPU: every run behind a digest uses 2 torch threads
(``THREADS``; the tests set the same count), on the CPU family named in the digest file.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil

DIGEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digests")
THREADS = 2  # torch's intra-op threads of every run behind a digest and of the tests that compare with one

# what no two runs share: JSON keys of times and process ids, and the same in printed text
VOLATILE_KEYS = re.compile(r"(^|_)(seconds|time|created|finished|started|updated|pid|elapsed|per_second|rate|when|"
                           r"date|duration)(_|$)|_s$", re.I)  # whole words: not "candidates", "degenerate"
VOLATILE_TEXT = re.compile(r"\d+(\.\d+)?( ?s\b| ?ms\b| images?/s| img/s)|\d{4}-\d\d-\d\d[T ][\d:.]+|pid \d+")


def threads_env(env=None):
    """``env`` (default os.environ) with OMP_NUM_THREADS = THREADS: a child process's torch threads."""
    return dict(os.environ if env is None else env, OMP_NUM_THREADS=str(THREADS))


def without_progress_bars(text):
    """``text`` less tqdm's progress bars (their rates and times differ from run to run)."""
    return "\n".join(part for line in text.split("\n") for part in line.split("\r") if "%|" not in part)


def printed_lines(text, root=None):
    """The lines of a run's printed output less times, process ids and progress bars; ``root`` written <root>."""
    text = text.replace(root, "<root>") if root else text
    return VOLATILE_TEXT.sub("<t>", without_progress_bars(text)).splitlines()


def is_subsequence(old_lines, new_lines):
    """Whether every line of ``old_lines`` appears in ``new_lines`` in the same order (new lines may be added)."""
    it = iter(new_lines)
    return all(any(line == n for n in it) for line in old_lines)


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: (None if VOLATILE_KEYS.search(k) else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str):
        return VOLATILE_TEXT.sub("<t>", obj)
    return obj


def _plain(obj):
    """Tensors as their bytes in hex, so that a saved object can go through ``_scrub`` and ``json``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "numpy"):
        return [str(obj.dtype), list(obj.shape), obj.contiguous().numpy().tobytes().hex()]
    return obj


def comparable(path, root=None, keys=None):
    """A file's bytes, or for JSON, logs and reports its content without the volatile parts (``VOLATILE_*``);
    ``root``: the folder the run wrote into, written ``<root>`` wherever a file names it; ``keys``: a JSON file's
    key tree (``key_tree``) to keep only those keys (the keys an older file had)."""
    with open(path, "rb") as f:
        raw = f.read()
    if root:
        raw = raw.replace(root.encode(), b"<root>")
    if path.endswith(".json"):
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw
        return json.dumps(_scrub(obj if keys is None else restricted(obj, keys)), sort_keys=True)
    if path.endswith(".pt"):  # a cached SAE: its record holds the training time
        import torch
        text = json.dumps(_scrub(_plain(torch.load(path, map_location="cpu", weights_only=True))), sort_keys=True)
        return text.replace(root, "<root>") if root else text
    if path.endswith((".log", ".md", ".lock")) or os.path.basename(path) == "report.txt":
        return VOLATILE_TEXT.sub("<t>", without_progress_bars(raw.decode(errors="replace")))
    return raw


def key_tree(obj):
    """The keys of a JSON value, nested: {key: key_tree(value)} for a dict, 0 for anything else."""
    return {k: key_tree(v) for k, v in obj.items()} if isinstance(obj, dict) else 0


def restricted(obj, keys):
    """``obj`` with only the keys of the key tree ``keys`` (recursively in dicts)."""
    if isinstance(obj, dict) and isinstance(keys, dict):
        return {k: restricted(v, keys[k]) for k, v in obj.items() if k in keys}
    return obj


def sha256(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def files_below(folder):
    """Relative paths of the files below ``folder``."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def folder_digest(folder, root=None, with_keys=False, skip=()):
    """{relative path: {"sha256": of ``comparable``}} of every file below ``folder`` (less the paths ending in one
    of ``skip``); ``with_keys``: JSON files also keep their key tree (``keys``), so that a newer file with more keys
    can be compared."""
    out = {}
    for rel in files_below(folder):
        if rel.endswith(tuple(skip)) and skip:
            continue
        path = os.path.join(folder, rel)
        entry = {"sha256": sha256(comparable(path, root))}
        if with_keys and path.endswith(".json"):
            try:
                entry["keys"] = key_tree(json.load(open(path, "rb")))
            except ValueError:
                pass
        out[rel] = entry
    return out


def differing_files(folder, digest, root=None, extra_ok=False, skip=()):
    """Relative paths below ``folder`` that differ from ``digest`` (``folder_digest``) or are missing on one side
    (``only in old: P``, ``only in new: P``); ``extra_ok``: files the digest lacks are fine; ``skip``: paths ending
    in one of these are left out on both sides."""
    have = [p for p in files_below(folder) if not (skip and p.endswith(tuple(skip)))]
    digest = {p: v for p, v in digest.items() if not (skip and p.endswith(tuple(skip)))}
    out = [f"only in old: {p}" for p in sorted(set(digest) - set(have))]
    out += [] if extra_ok else [f"only in new: {p}" for p in sorted(set(have) - set(digest))]
    out += [p for p in sorted(set(have) & set(digest))
            if sha256(comparable(os.path.join(folder, p), root, digest[p].get("keys"))) != digest[p]["sha256"]]
    return out


@contextlib.contextmanager
def folder_of_its_own(folder):
    """``folder`` (made anew, removed at the end) for this process alone: an exclusive lock on ``folder``.lock
    waits for another test session that uses the same folder."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def path_of(commit):
    return os.path.join(DIGEST_DIR, f"{commit}.json")


def load(commit):
    """The digests of ``commit`` (tests/digests/COMMIT.json)."""
    with open(path_of(commit)) as f:
        return json.load(f)
