"""The store written by stage 1: plain memory-mappable ``.npy`` arrays plus ``manifest.json``.

Layout of ``STORE/{model}_channel_importances/`` (one row per training image, ImageFolder order):
  attributions.npy  (N, C_out) float16   A_n, activation x gradient per channel
  targets.npy       (N,) int64           label
  predictions.npy   (N,) int64           argmax of the logits
  patch_sums.npy    (N, C_in, kh, kw) float32   P_n, patch sums of the layer's input
  manifest.json     what made it, and whether every row is complete
  progress/         while incomplete: chunk_{i}.npz per finished chunk of rows not yet merged into the
                    arrays, an empty chunk_{i} per merged one, rows.json (each chunk's image names and labels,
                    hashed: a rerun on changed data keeps the finished chunks whose images are unchanged)
  .lock             the stage-1 writer's lock (pid and host of the run holding it)

The manifest is the commit point: later stages refuse a store whose manifest is missing,
incomplete, or made by another model, weights, layer or dataset. A complete manifest records each array's size and
sha256 (``digests``, computed when stage 1 finishes: rows are merged out of order, so the
file is hashed once, read back, not while written). Opening a store checks every array's header and length
against the manifest (a few bytes read) and its sha256 under ``FULL_CHECK`` (``check_arrays``); a store written
before digests were kept is read as before.
"""
import datetime
import hashlib
import os
import platform
import shutil

import numpy as np

from utils.files import atomic, digests, leftovers, names, reading
from utils.files.names import store_folder
from utils.errors import UserError

ARRAYS = ("attributions", "targets", "predictions", "patch_sums")
UNREADABLE_PREDICTION = -1  # the prediction stored for an image that could not be read (its row is all zeros)
# Keys that must agree for a later stage to read a store.
MATCH_KEYS = ("model", "weights_sha256", "layer", "layer_geometry", "classes", "images_per_class", "files_sha256",
              "transform")
# Keys that must also agree to reuse or resume a store (they change the numbers written). ``class_outputs``:
# later stages take the store's (they never differ there), stage 1 compares its --class_index_map.
COMPLETE_KEYS = MATCH_KEYS + ("autocast", "decode", "class_outputs")
RESUME_KEYS = COMPLETE_KEYS + ("num_images", "chunk_size")
# Keys that describe the data: when only these differ, an unfinished store keeps the finished chunks whose images
# (names and labels) are unchanged and recomputes the rest (``Store.restart_on_new_data``).
DATASET_KEYS = ("classes", "images_per_class", "files_sha256", "num_images", "class_outputs")
# The arrays' sha256 is verified on every open when they hold at most this many bytes together (256 MiB: 0.93 s
# on a shared, loaded 2-core machine; benchmarks/store_check.py --gib 0.25); a larger store
# verifies the sha256 of an array modified after its manifest was written (rewritten, replaced, or copied without
# keeping times), and the header and length of every array (about 2 ms).
FULL_CHECK = 1 << 28


def rewrite_hint(folder):
    """What to do about a damaged store: the command that writes it again."""
    return (f"the store is damaged: delete {folder} and rerun get_importances_for_classes.py with the flags it was "
            f"made with (its manifest.json lists them)")


def find_folder(store_dir, tag, name, layer):
    """The store folder of a run named ``name`` (``models.file_tag``): ``{name}_channel_importances``; for a layer
    other than the default, a store written before the layer was in the name (``{tag}_channel_importances``
    whose manifest names ``layer``) is used when there is no folder of the new name."""
    folder = store_folder(store_dir, name)
    if name != tag and not os.path.isdir(folder):
        old = store_folder(store_dir, tag)
        if (Store.peek(old) or {}).get("layer") == layer:
            return old
    return folder


def find_stores(store_dir):
    """[(folder, manifest)] of every store (complete or not) directly under ``store_dir``, sorted by folder."""
    if not store_dir or not os.path.isdir(store_dir):
        return []
    out = []
    for name in sorted(os.listdir(store_dir)):
        folder = os.path.join(store_dir, name)
        if names.is_store_folder_name(name) and os.path.isfile(names.manifest(folder)):
            try:
                out.append((folder, atomic.read_json(names.manifest(folder), rewrite_hint(folder))))
            except ValueError:
                continue
    return out


def versions():
    import torch
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fingerprint(model_spec, weights_id, weights_sha, layer_path, geometry, summary, transform):
    """What identifies the numbers in a store (see MATCH_KEYS)."""
    return {"model": model_spec, "weights": weights_id, "weights_sha256": weights_sha,
            "layer": layer_path, "layer_geometry": geometry, "data_dir": summary["data_dir"],
            "classes": summary["classes"], "images_per_class": summary["images_per_class"],
            "files_sha256": summary["files_sha256"], "transform": transform}


def describe_dataset_change(found, expected, keys=("classes", "images_per_class", "files_sha256")):
    """What differs between the data of a stored manifest and the current one, in one phrase (None: the same):
    class folders added or gone, else the classes whose image counts changed, else other file names (each only
    where ``keys`` holds its key); the data folder only when it moved."""
    def some(items):
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
    a, b = found.get("classes") or [], expected.get("classes") or []
    parts = []
    if a != b and "classes" in keys:
        gone, new = [c for c in a if c not in b], [c for c in b if c not in a]
        if gone:
            parts.append(f"class folder{'s' if len(gone) > 1 else ''} {some([repr(c) for c in gone])} gone")
        if new:
            parts.append(f"new class folder{'s' if len(new) > 1 else ''} {some([repr(c) for c in new])}")
        if not gone and not new:
            parts.append("the class folders in another order")
    elif a == b:
        counts = zip(a, found.get("images_per_class") or [], expected.get("images_per_class") or [])
        changed = [f"{c!r} {x} stored, {y} now" for c, x, y in counts if x != y] if "images_per_class" in keys else []
        if changed:
            parts.append("images per class: " + some(changed) + f" ({sum(found.get('images_per_class') or [])} "
                         f"in all stored, {sum(expected.get('images_per_class') or [])} now)")
        elif found.get("files_sha256") != expected.get("files_sha256") and "files_sha256" in keys:
            parts.append("the same classes and counts, but other image file names")
    if not parts:
        return None
    if found.get("data_dir") != expected.get("data_dir"):
        parts.append(f"data folder stored {found.get('data_dir')}, now {expected.get('data_dir')}")
    return "; ".join(parts)


def describe_mismatch(found, expected, keys):
    """One line naming the keys that differ between a stored manifest and the current flags (the data's keys as
    one phrase: ``describe_dataset_change``)."""
    diffs = []
    data = describe_dataset_change(found, expected, keys)
    if data:
        diffs.append(f"dataset ({data})")
    for k in keys:
        a, b = found.get(k), expected.get(k)
        if a != b:
            if k in ("classes", "images_per_class", "files_sha256") and data:
                continue  # described above
            elif k == "num_images" and data:
                continue  # follows from the data's change
            elif k == "weights_sha256":
                if found.get("weights") == expected.get("weights"):
                    diffs.append(f"weights ({found.get('weights')} both times, but other values: the weights file "
                                 f"or the model's code changed since)")
                else:
                    diffs.append(f"weights (stored {found.get('weights')}, now {expected.get('weights')})")
            elif k == "class_outputs":
                if data and found.get("classes") != expected.get("classes"):
                    continue  # other folders, other outputs
                diffs.append(f"the class folders' model outputs (stored {found.get('class_outputs_from', 'folder order')}"
                             f", now {expected.get('class_outputs_from', 'folder order')})")
            else:
                diffs.append(f"{k} (stored {a}, now {b})")
    return "; ".join(diffs)


def only_data_differs(found, expected, keys):
    """True when ``found`` and ``expected`` differ in the data's keys (DATASET_KEYS) alone: other image files or
    class folders, the same model, weights, layer, transform and settings (a --class_index_map that maps the same
    folders otherwise is not the data's change)."""
    if not describe_mismatch(found, expected, keys):
        return False
    others = [k for k in keys if k not in DATASET_KEYS]
    if describe_mismatch(found, expected, others):
        return False
    same_folders = found.get("classes") == expected.get("classes")
    return not (same_folders and found.get("class_outputs") != expected.get("class_outputs"))


def chunk_hashes(row_names, chunk_size):
    """SHA-256 of each chunk's rows (``row_names``: one string per row, the image's path and its stored label),
    chunk i holding rows i * chunk_size ... (i + 1) * chunk_size - 1."""
    return [hashlib.sha256("\n".join(row_names[lo:lo + chunk_size]).encode()).hexdigest()
            for lo in range(0, len(row_names), chunk_size)]


class Store:
    """Access to one store folder. ``Store.open`` for reading, ``Store.create_or_resume`` for stage 1."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest

    def path(self, name):
        return names.store_array(self.folder, name)

    @property
    def progress_dir(self):
        return names.progress_dir(self.folder)

    # ---------------------------------------------------------------- reading
    @classmethod
    def open(cls, folder, expected=None):
        """Open a complete store read-only, checking it against ``expected`` (a fingerprint)."""
        mpath = names.manifest(folder)
        if not os.path.isfile(mpath):
            raise UserError(f"no store at {folder} (manifest.json missing): run get_importances_for_classes.py "
                            f"with the same --store_dir, --model, --weights and --layer_of_interest first")
        manifest = atomic.read_json(mpath, rewrite_hint(folder))
        if not isinstance(manifest, dict):
            raise reading.Damaged(mpath, "not a store manifest (no JSON object)", rewrite_hint(folder))
        if expected is not None:
            diff = describe_mismatch(manifest, expected, MATCH_KEYS)
            if diff:
                raise UserError(f"the store at {folder} was made with other settings: {diff}; "
                                f"pass the flags it was made with or another --store_dir")
        if not manifest.get("complete"):
            done = len(cls(folder, manifest).done_chunks())
            raise UserError(f"the store at {folder} is incomplete ({done} of {manifest.get('num_chunks')} "
                            f"chunks done): rerun get_importances_for_classes.py with the same flags to finish it")
        for name in ARRAYS:
            if not os.path.isfile(names.store_array(folder, name)):
                raise UserError(f"the store at {folder} lacks {name}.npy: rerun stage 1 into a new --store_dir")
        st = cls(folder, manifest)
        st.check_arrays()
        return st

    def check_arrays(self, full=None):
        """Refuse (one line, ``reading.Damaged``) an array whose header, length or sha256 is not what stage 1
        wrote. Always: the header against the manifest's shape and dtype, the length against the header.
        The sha256 (``digests.problem``): every time when the arrays hold at most ``FULL_CHECK`` bytes together
        (or ``full``), else for an array modified after the manifest was written. A manifest without
        ``digests`` (written before they were kept) is checked for headers and lengths only."""
        arrays, records = self.manifest.get("arrays") or {}, self.manifest.get("digests") or {}
        hint = rewrite_hint(self.folder)
        for name in ARRAYS:
            want = arrays.get(name) or {}
            self.array(name, want.get("shape"), want.get("dtype"))
        if full is None:
            full = sum(os.path.getsize(self.path(n)) for n in ARRAYS) <= FULL_CHECK
        written = os.stat(names.manifest(self.folder)).st_mtime_ns
        for name in ARRAYS:
            problem = digests.problem(self.path(name), records.get(f"{name}.npy"), full, written)
            if problem:
                raise reading.Damaged(self.path(name), problem, hint)

    def array(self, name, shape=None, dtype=None):
        """Memory-mapped read-only array (numpy.load(..., mmap_mode='r')); its header and length are checked
        first (``reading.open_npy``: one line for a file cut short or garbled)."""
        return reading.open_npy(self.path(name), shape, dtype, rewrite_hint(self.folder))

    def unreadable_rows(self):
        """(M,) int64 rows of images stage 1 could not read (``--skip_unreadable``): prediction -1."""
        return np.flatnonzero(np.asarray(self.array("predictions")) == UNREADABLE_PREDICTION)

    def labels(self):
        """(N,) int64 class (folder) indices of the rows, -1 for the rows of unreadable images (left out of every
        count). ``targets.npy`` holds the model's output index of each row's class; a store whose manifest maps
        the folders to other outputs (``class_outputs``) is mapped back here."""
        y = np.array(self.array("targets"), dtype=np.int64)
        outputs = self.manifest.get("class_outputs")
        if outputs is not None:
            back = np.full(max(outputs) + 1, -1, dtype=np.int64)
            back[np.asarray(outputs, dtype=np.int64)] = np.arange(len(outputs))
            y = back[y]
        y[self.unreadable_rows()] = -1
        return y

    # ---------------------------------------------------------------- writing (stage 1)
    @staticmethod
    def peek(folder):
        """The manifest of ``folder`` if there is one, else None."""
        mpath = names.manifest(folder)
        return atomic.read_json(mpath, rewrite_hint(folder)) if os.path.isfile(mpath) else None

    @staticmethod
    def lock(folder):
        """Take the writer's lock of ``folder`` (created if missing) for this process; returns the held lock.

        A second stage-1 run on the same store gets a one-line UserError naming the holder (pid, host)
        and changes nothing. The lock is a POSIX record lock: it goes away with its process, also one
        killed with SIGKILL, and the next run takes it over.
        """
        os.makedirs(folder, exist_ok=True)
        try:
            lock = atomic.FileLock(names.store_lock(folder))
        except atomic.LockHeld as e:
            raise UserError(f"another run ({e.holder}) is writing the store {folder}: wait for it to finish "
                            f"or stop it (nothing was changed)")
        leftovers.sweep(folder)  # what a killed run left (``utils.files.leftovers``)
        return lock

    @classmethod
    def create_or_resume(cls, folder, info, shapes, allow_mixed_numerics=False, row_names=None, log=None):
        """Return ``(store, status)``, status one of 'new', 'resume', 'complete' (main process only).

        ``info``: fingerprint plus num_images, chunk_size, autocast, decode, batch_size and ``numerics``
        (device, threads, TF32: what changes the floating-point results). ``shapes``: {name: (shape, dtype)}.
        ``row_names``: one string per row (image path and stored label), hashed per chunk into progress/rows.json.
        A store whose fingerprint differs is refused, except an unfinished one whose data alone changed (an image
        removed or added after a stop): it keeps the finished chunks whose images are unchanged and recomputes
        the rest, or starts afresh, saying which on ``log`` (``restart_on_new_data``). One whose numerics differ
        is refused unless ``allow_mixed_numerics``, which records the new numerics in the manifest's
        ``numerics_history``.
        """
        mpath = names.manifest(folder)
        if os.path.isfile(mpath):
            manifest = atomic.read_json(mpath, rewrite_hint(folder))
            keys = COMPLETE_KEYS if manifest.get("complete") else RESUME_KEYS
            diff = describe_mismatch(manifest, info, keys)
            store = cls(folder, manifest)
            if diff and not manifest.get("complete") and row_names is not None \
                    and only_data_differs(manifest, info, keys):
                return store.restart_on_new_data(info, shapes, row_names, diff, log or print)
            if diff:
                raise UserError(f"{folder} already holds a store made with other settings: {diff}; "
                                f"pass another --store_dir (nothing was changed)")
            if manifest.get("complete"):
                return store, "complete"
            old, new = manifest.get("numerics"), info.get("numerics")
            if old is not None and old != new:
                if not allow_mixed_numerics:
                    raise UserError(f"{folder} was written with {describe_numerics(old)}, this run would use "
                                    f"{describe_numerics(new)}: rerun with the recorded settings, or pass "
                                    f"--allow_mixed_numerics to continue anyway (recorded in the manifest)")
                history = manifest.get("numerics_history") or [dict(old, since=manifest.get("created"))]
                store.manifest = dict(manifest, numerics=new,
                                      numerics_history=history + [dict(new, since=now())])
                atomic.write_json(mpath, store.manifest)
            store.clean_progress()
            if not store.arrays_fit(shapes):  # a restart killed between its arrays and its manifest
                store.remake_arrays(shapes)
            if row_names is not None:  # the fingerprint vouches for the names: record them for a later change
                store.write_rows(row_names)
            return store, "resume"
        store = cls(folder, None)
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(store.progress_dir):
            shutil.rmtree(store.progress_dir)
        os.makedirs(store.progress_dir, exist_ok=True)
        store.start(info, shapes, row_names)
        return store, "new"

    def start(self, info, shapes, row_names):
        """Write empty arrays of ``shapes``, progress/rows.json and an incomplete manifest of ``info`` (the last:
        the commit point), keeping what progress/ holds."""
        self.remake_arrays(shapes)
        if row_names is not None:
            self.write_rows(row_names, info["chunk_size"])
        self.manifest = dict(info, complete=False, created=now(), versions=versions(),
                             arrays={k: {"shape": list(s), "dtype": np.dtype(d).name} for k, (s, d) in shapes.items()})
        atomic.write_json(names.manifest(self.folder), self.manifest)

    def remake_arrays(self, shapes):
        """Empty (zero) arrays of ``shapes`` = {name: (shape, dtype)}, replacing what is there. Only when no chunk
        is merged: merged rows live in the arrays."""
        if any(os.path.exists(self._chunk_file(i, merged=True)) for i in self.done_chunks()):
            raise UserError(f"the arrays of {self.folder} do not have the shapes its manifest records and hold "
                            f"merged rows: run stage 1 into a new --store_dir")
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(self.path(name), mode="w+", dtype=dtype, shape=shape).flush()

    def arrays_fit(self, shapes):
        """Whether every array file exists with the shape and dtype of ``shapes``."""
        for name, (shape, dtype) in shapes.items():
            try:
                a = np.load(self.path(name), mmap_mode="r")
            except (OSError, ValueError):
                return False
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                return False
        return True

    def write_rows(self, row_names, chunk_size=None):
        """progress/rows.json: the chunk size and each chunk's SHA-256 of its rows' names (``chunk_hashes``)."""
        chunk_size = chunk_size or self.manifest["chunk_size"]
        record = {"chunk_size": chunk_size, "chunks_sha256": chunk_hashes(row_names, chunk_size)}
        path = names.progress_rows(self.folder)
        if not os.path.isfile(path) or atomic.read_json(path) != record:
            atomic.write_json(path, record)

    def read_rows(self, chunk_size):
        """The chunk hashes progress/rows.json records for ``chunk_size``, or None (none recorded, or another
        chunk size, or an unreadable file)."""
        try:
            record = atomic.read_json(names.progress_rows(self.folder))
        except (OSError, ValueError):
            return None
        return record.get("chunks_sha256") if record.get("chunk_size") == chunk_size else None

    def restart_on_new_data(self, info, shapes, row_names, diff, log):
        """An unfinished store whose data changed (``diff``, one phrase): keep the finished chunks whose rows'
        images (names and labels, progress/rows.json) are the same now, drop the others and start the store anew
        for the new data; the kept rows are those a fresh run would write, so the result equals one. Returns
        ``(self, 'resume')`` when a chunk is kept, else ``(self, 'new')``."""
        where = (f"{self.folder}: the data changed since this store was started "
                 f"({describe_dataset_change(self.manifest, info) or diff})")
        chunk_size = info["chunk_size"]
        old = self.read_rows(chunk_size) or []
        new = chunk_hashes(row_names, chunk_size)
        done = sorted(self.done_chunks())
        keep = [i for i in done if i < min(len(old), len(new)) and old[i] == new[i]]
        merged = [i for i in keep if os.path.exists(self._chunk_file(i, merged=True))
                  and not os.path.exists(self._chunk_file(i))]
        if merged:  # rows already in the arrays go back to chunk files: the arrays are made anew
            for i in merged:
                lo = i * chunk_size
                hi = min(lo + chunk_size, len(row_names))
                self.save_chunk(i, lo, {name: np.array(self.array(name)[lo:hi]) for name in ARRAYS})
        for i in done:  # a kept chunk is its .npz file now; a dropped one goes
            for f in [self._chunk_file(i, merged=True)] + ([] if i in keep else [self._chunk_file(i)]):
                if os.path.exists(f):
                    os.remove(f)
        self.clean_progress()
        self.start(info, shapes, row_names)
        if keep:
            log(f"{where}: keeping the {len(keep)} finished chunk{'s' if len(keep) > 1 else ''} whose images are "
                f"unchanged, computing the other {-(-len(row_names) // chunk_size) - len(keep)} chunk(s)")
            return self, "resume"
        why = ("it has no finished chunk" if not done else
               f"its {len(done)} finished chunk{'s' if len(done) > 1 else ''} cannot be checked (no record of their "
               f"images: a store started by an older version)" if not old else
               f"none of its {len(done)} finished chunk{'s' if len(done) > 1 else ''} holds the same images")
        log(f"{where}: {why}: starting afresh")
        return self, "new"

    def reload_manifest(self):
        self.manifest = atomic.read_json(names.manifest(self.folder), rewrite_hint(self.folder))

    # A finished chunk of rows is first saved as progress/chunk_{i}.npz by the process that computed it
    # (each file has exactly one writer, so processes on several machines never share a file page); the
    # main process merges them into the arrays at the end, leaving an empty progress/chunk_{i} behind.
    def _chunk_file(self, i, merged=False):
        return names.progress_chunk(self.folder, i, merged)

    def done_chunks(self):
        """Set of chunk indices whose rows are saved (pending merge) or already merged into the arrays."""
        if not os.path.isdir(self.progress_dir):
            return set()
        found = (names.progress_chunk_index(f) for f in os.listdir(self.progress_dir))
        return {i for i in found if i is not None}

    def clean_progress(self):
        """Remove temporary files that a killed run left in progress/ (main process, under the lock)."""
        if os.path.isdir(self.progress_dir):
            for f in os.listdir(self.progress_dir):
                if f.startswith(".tmp_"):
                    os.remove(os.path.join(self.progress_dir, f))

    def save_chunk(self, i, lo, rows):
        """Save chunk ``i`` (rows ``lo`` ...) durably: ``rows`` = {array name: (m, ...) numpy array}."""
        atomic.save_npz(self._chunk_file(i), dict(rows, lo=np.asarray(lo, dtype=np.int64)))

    def merge_chunks(self, progress=None):
        """Write every saved chunk into the arrays (main process). Idempotent: a crash mid-way is resumed."""
        pending = sorted(i for i in self.done_chunks() if os.path.exists(self._chunk_file(i)))
        if not pending:
            return
        with RowWriter({name: self.path(name) for name in ARRAYS}) as writer:
            for i in (progress(pending) if progress else pending):
                z = reading.load_npz(self._chunk_file(i), "delete it and rerun the same stage-1 command (its rows "
                                                          "are computed again)")
                lo = int(z["lo"])
                for name in ARRAYS:
                    writer.write(name, lo, z[name])
                writer.sync()
                with open(self._chunk_file(i, merged=True), "w"):
                    pass
                os.remove(self._chunk_file(i))

    def array_digests(self):
        """{file name: digests.record} of every array as it is now (read back once, when the store is finished)."""
        return {f"{name}.npy": digests.record(self.path(name)) for name in ARRAYS}

    def finish(self, num_chunks, unreadable_names=()):
        """Mark the store complete once every chunk is merged (main process only)."""
        missing = [i for i in range(num_chunks) if not os.path.exists(self._chunk_file(i, merged=True))]
        if missing:
            raise UserError(f"{len(missing)} chunks of {self.folder} are not done (first: {missing[0]}); "
                            f"rerun the same command to finish them")
        manifest = dict(self.manifest, complete=True, rows_complete=self.manifest["num_images"],
                        unreadable=list(unreadable_names), finished=now(), digests=self.array_digests())
        atomic.write_json(names.manifest(self.folder), manifest)
        self.manifest = manifest
        shutil.rmtree(self.progress_dir, ignore_errors=True)


def describe_numerics(n):
    """One phrase for a ``numerics`` record: what changes a store's floating-point results."""
    if not n:
        return "unrecorded numerics"
    if n.get("device") == "cuda":
        text = (f"CUDA on {n.get('gpu')} (conv float32 precision {n.get('conv_fp32')}, matmul "
                f"{n.get('matmul_fp32')})")
    else:
        text = f"CPU with {n.get('cpu_threads')} threads (--cpu_threads {n.get('cpu_threads')})"
    extras = [f"GPU JPEG decoder {n['decoder']}" if n.get("decoder") else None,
              "--fast_resize" if n.get("fast_resize") else None,
              "--deterministic" if n.get("deterministic") else None]
    extras = [e for e in extras if e]
    return text + (", " + ", ".join(extras) if extras else "")


class RowWriter:
    """Writes whole rows into existing ``.npy`` files with positional writes (``os.pwrite``), no memory map.

    Only the bytes of the rows written are touched, and nothing of the file is mapped into the process.
    ``sync()`` makes everything written so far durable (before a chunk is marked merged).
    """

    def __init__(self, paths):
        self.fds, self.layout = {}, {}
        try:
            for name, path in paths.items():
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
                if fortran:
                    raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                self.layout[name] = (offset, row_bytes, tuple(shape), dtype)
                self.fds[name] = os.open(path, os.O_WRONLY)
        except BaseException:
            self.close()
            raise

    def write(self, name, lo, rows):
        """Write ``rows`` (shape (m,) + row shape) as rows lo .. lo + m - 1 of array ``name``."""
        offset, row_bytes, shape, dtype = self.layout[name]
        a = np.ascontiguousarray(rows, dtype=dtype)
        if a.shape[1:] != shape[1:] or lo < 0 or lo + len(a) > shape[0]:
            raise ValueError(f"{name}: cannot write rows {lo}..{lo + len(a) - 1} of shape {a.shape[1:]} "
                             f"into an array of shape {shape}")
        buf = memoryview(a.reshape(-1).view(np.uint8))
        pos = offset + lo * row_bytes
        while len(buf):
            n = os.pwrite(self.fds[name], buf, pos)
            buf, pos = buf[n:], pos + n

    def sync(self):
        for fd in self.fds.values():
            os.fsync(fd)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
