"""Stage 1: one pass over the training images, writing attributions, labels, predictions and patch sums.

The rows are cut into fixed chunks. The process that computes a chunk saves it whole as one file
(``progress/chunk_{i}.npz``, written under a temporary name and renamed: the chunk's commit point);
at the end the main process merges the chunk files into the store's arrays. An interrupted run
resumes at the unfinished chunks and ends with the same arrays as an uninterrupted one. Under
torchrun the unfinished chunks are dealt round-robin to the ranks; no two processes ever write the
same file, so nothing depends on how a shared file system flushes partial pages.

Per batch: images go to the device, one forward pass with the head-only backward gives A, the
predictions and P (see attribution.py); on CUDA the three results are copied back into pinned
host memory asynchronously and written only after the copy's event has completed, while the next
batch already computes. With a GPU decoder (``--gpu_decode``) a background thread decodes batch b + 1 on
a side stream meanwhile (overlap.py).
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from utils.model import tap

from utils.method import attribution
from utils.data import folders
from utils import finite
from utils.stages import distributed
from utils.data import overlap
from utils.errors import UserError
from utils.files.store import COMPLETE_KEYS, RESUME_KEYS, UNREADABLE_PREDICTION, Store, describe_mismatch


def stage1_batch(model, conv, images, labels, autocast_dtype=None):
    """Attributions, predictions and patch sums of one batch, on the images' device.

    images: (B, 3, H, W) on the model's device; labels: (B,) long.
    Returns A (B, C_out) float16, predictions (B,) long, P (B, C_in, kh, kw) float32.
    """
    x, a, g, logits = tap.logits_and_layer_grad(model, conv, images, labels, autocast_dtype)
    A = attribution.channel_attribution(a, g)
    P = attribution.conv_patch_sums(x, conv)
    return A.half(), logits.argmax(dim=1), P


def default_chunk_size(batch_size, target=2048):
    """Rows per resumable chunk: a multiple of the batch size near ``target``."""
    return batch_size * max(1, target // batch_size)


def numerics(device, cpu_threads=None, decoder=None, fast_resize=False, deterministic=False):
    """What changes stage 1's floating-point results besides the model and the data (for the manifest).

    CPU: the number of intra-op threads (oneDNN rounds differently with one thread than with several).
    CUDA: the GPU model and the float32 precision of convolutions and matrix products (TF32 or IEEE).
    Recorded only when used (a store without them has none of these keys): ``decoder``, the GPU JPEG
    decoder ('nvjpeg' or 'nvimgcodec', they differ in a few grey levels); ``fast_resize`` (reduced-size
    JPEG decoding and a resize of the cropped region only, see cpu_decode.py); ``deterministic``
    (deterministic algorithms, no cuDNN benchmark mode).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        out = {"device": "cuda", "gpu": torch.cuda.get_device_name(dev),
               "conv_fp32": torch.backends.cudnn.conv.fp32_precision,
               "matmul_fp32": torch.backends.cuda.matmul.fp32_precision}
    else:
        out = {"device": dev.type, "cpu_threads": int(cpu_threads or torch.get_num_threads())}
    if decoder:
        out["decoder"] = decoder
    if fast_resize:
        out["fast_resize"] = True
    if deterministic:
        out["deterministic"] = True
    return out


class deterministic_algorithms:
    """Context: deterministic algorithms for the enclosed stage (cuDNN deterministic, no benchmark mode,
    ``torch.use_deterministic_algorithms(True, warn_only=True)``: ops without a deterministic version
    (stage 1's backward through adaptive average pooling and ``gather``, deterministic for these shapes)
    warn instead of failing); the previous settings come back at the end. ``on=False``: cuDNN's benchmark
    mode on CUDA (the default: the fastest algorithms for the one input size)."""

    def __init__(self, device, on=True):
        self.cuda = torch.device(device).type == "cuda"
        self.on = on

    def __enter__(self):
        self.saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                      torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled())
        if self.on:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif self.cuda:
            torch.backends.cudnn.benchmark = True  # one input size throughout
        return self

    def __exit__(self, *exc):
        det, bench, algos, warn_only = self.saved
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench
        torch.use_deterministic_algorithms(algos, warn_only=warn_only)


class _HostCopy:
    """The results of one batch on their way to host memory (asynchronously on CUDA)."""

    def __init__(self, tensors, pinned):
        if tensors[0].device.type == "cuda":
            self.host = [p[:len(t)] for p, t in zip(pinned, tensors)]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensors, None

    def numpy(self):
        if self.event is not None:
            self.event.synchronize()
        return [h.numpy() for h in self.host]


def _pinned_buffers(batch_size, conv, device):
    """Two sets of page-locked host buffers for a batch's A, predictions and P (CUDA only), used by
    alternate batches: batch b + 1's copy never overwrites batch b's results before they are written."""
    if torch.device(device).type != "cuda":
        return [None, None]
    c_out, c_in, kh, kw = conv.weight.shape
    return [[torch.empty((batch_size, c_out), dtype=torch.float16).pin_memory(),
             torch.empty((batch_size,), dtype=torch.int64).pin_memory(),
             torch.empty((batch_size, c_in, kh, kw), dtype=torch.float32).pin_memory()] for _ in range(2)]


class _ChunkBuffer:
    """Rows of the chunks this process computes, saved as one file per chunk once complete."""

    def __init__(self, store, chunk_size, n, shapes):
        self.store, self.chunk_size, self.n, self.shapes = store, chunk_size, n, shapes
        self.open = {}
        self.saved = []

    def add(self, rows, values):
        """``rows``: list of consecutive row indices of one chunk; ``values``: {name: (len(rows), ...)}."""
        i = rows[0] // self.chunk_size
        lo = i * self.chunk_size
        m = min(lo + self.chunk_size, self.n) - lo
        if i not in self.open:
            self.open[i] = ({name: np.zeros((m,) + shape[1:], dtype) for name, (shape, dtype) in self.shapes.items()},
                            0)
        arrays, filled = self.open[i]
        for name, v in values.items():
            arrays[name][rows[0] - lo:rows[-1] - lo + 1] = v
        filled += len(rows)
        if filled == m:
            self.store.save_chunk(i, lo, arrays)
            self.saved.append(i)
            del self.open[i]
        else:
            self.open[i] = (arrays, filled)


def _batch_rows(ok, results, rows, targets):
    """The store rows of one batch: results of the readable images, zeros and prediction -1 elsewhere."""
    A, pred, P = results
    if ok.all():
        return {"attributions": A, "targets": targets, "predictions": pred, "patch_sums": P}
    full_A = np.zeros((len(rows),) + A.shape[1:], A.dtype)
    full_P = np.zeros((len(rows),) + P.shape[1:], P.dtype)
    full_pred = np.full(len(rows), UNREADABLE_PREDICTION, dtype=np.int64)
    full_A[ok], full_P[ok], full_pred[ok] = A, P, pred
    return {"attributions": full_A, "targets": targets, "predictions": full_pred, "patch_sums": full_P}


@dataclass(frozen=True)
class PassSettings:
    """How ``run_stage1`` computes the rows (resolved from the flags by utils/stages/stage1.py).

    ``batch_size``, ``device``, ``num_workers`` (loader processes); ``chunk_size``: rows per resumable chunk, None
    keeps an existing store's, else default_chunk_size. ``autocast_dtype``: e.g. torch.bfloat16, or None.
    ``gpu_decoder``: optional callable turning a loader batch into (images, labels) on the device (labels
    UNREADABLE where a file could not be decoded); batch b + 1 is decoded in a background thread (on CUDA on a
    side stream) while batch b computes (overlap.Prefetch), with ``gpu_decoder.decode_batch`` where it has one
    (it also says which images are readable without waiting for the device).
    ``deterministic``: deterministic algorithms (see ``deterministic_algorithms``) instead of cuDNN's
    benchmark mode. ``uint8_images``: the dataset yields uint8 images (``folders.eval_transform_uint8``),
    normalized on the device with ``folders.normalize_uint8`` and ``mean``, ``std`` (bit-identical to the float
    transform, a quarter of the bytes). ``skip_unreadable``: store an unreadable image as a row of zeros with
    prediction -1 (its file name goes into the manifest) instead of stopping with a one-line error that names
    it. ``allow_mixed_numerics``: resume a store written under other numerics. ``class_outputs``: (K,) output
    index of each class folder (``utils/data/classmap.py``), or None when folder y is output y: the logit
    differentiated and the stored target.
    """
    batch_size: int
    device: torch.device
    num_workers: int = 0
    chunk_size: int = None
    autocast_dtype: torch.dtype = None
    channels_last: bool = False
    gpu_decoder: object = None
    skip_unreadable: bool = False
    allow_mixed_numerics: bool = False
    uint8_images: bool = False
    deterministic: bool = False
    mean: tuple = folders.MEAN
    std: tuple = folders.STD
    class_outputs: tuple = None


class _Rows:
    """What the per-batch loop of one process needs: the model, the data, where the rows go, and its clock."""

    def __init__(self, model, conv, ds, ps, chunks, bar):
        self.model, self.conv, self.ds, self.ps, self.chunks, self.bar = model, conv, ds, ps, chunks, bar
        device = ps.device
        self.pinned = _pinned_buffers(ps.batch_size, conv, device)
        self.mean_std = [torch.tensor(v, dtype=torch.float32, device=device) for v in (ps.mean, ps.std)]
        self.outputs = None if ps.class_outputs is None else (
            np.asarray(ps.class_outputs, dtype=np.int64),
            torch.as_tensor(ps.class_outputs, dtype=torch.int64, device=device))
        self.clock = []  # (time, rows written so far) after each write
        self.start = time.time()

    def write(self, pending):
        """Write a batch's rows once their copy to the host is done: (rows, ok, targets, _HostCopy)."""
        rows, ok, targets, copy = pending
        results = copy.numpy()
        for values, what in ((results[0], "attributions"), (results[2], "patch sums")):
            finite.refuse_nonfinite(values, f"the {what} of training images {rows[0]}..{rows[-1]}",
                                    "the layer's activations or gradients are not finite or exceed float16's range "
                                    "(65504): the store is not marked complete")
        self.chunks.add(rows, _batch_rows(ok, results, rows, targets))
        self.bar.update(len(rows))
        self.clock.append((time.time(), (self.clock[-1][1] if self.clock else 0) + len(rows)))

    def on_device(self, batch):
        """(images, labels, ok) of a loader batch on the device; ok (B,) numpy bool: the readable images."""
        if self.ps.gpu_decoder is not None:
            return batch
        images, labels = batch
        ok = (labels != folders.UNREADABLE).numpy()  # read on the host: no device sync
        images = images.to(self.ps.device, non_blocking=True)
        labels = labels.to(self.ps.device, non_blocking=True)
        if self.ps.uint8_images:
            images = folders.normalize_uint8(images, *self.mean_std)
        return images, labels, ok

    def results(self, images, labels):
        """stage1_batch's (A, predictions, P) of the readable images (empty when there is none)."""
        if self.ps.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if len(labels):
            return stage1_batch(self.model, self.conv, images, labels, self.ps.autocast_dtype)
        c_out, c_in, kh, kw = self.conv.weight.shape  # every image of the batch unreadable
        return (torch.zeros((0, c_out), dtype=torch.float16), torch.zeros(0, dtype=torch.int64),
                torch.zeros((0, c_in, kh, kw)))


def _compute(r, batches, source, loader):
    """The per-batch loop of ``run_stage1``: images to the device, stage1_batch, results into ``r.chunks``.
    The results of batch b are written while batch b + 1 computes (their copy to the host is awaited then).
    The class folders' output indices (``r.outputs``) apply to the labels of the readable images."""
    pending = None  # (rows, ok, targets, _HostCopy) of the previous batch, written once its copy is done
    for b, (rows, batch) in enumerate(zip(batches, source)):
        images, labels, ok = r.on_device(batch)
        targets = np.asarray([r.ds.targets[i] for i in rows], dtype=np.int64)
        if r.outputs is not None:  # the model's output index of each folder: the stored target and the logit
            targets = r.outputs[0][targets]
        if not ok.all():
            if not r.ps.skip_unreadable:
                if pending is not None:
                    r.write(pending)  # keep every finished chunk
                raise loader.error(rows[int(np.flatnonzero(~ok)[0])])
            keep = torch.from_numpy(ok).to(images.device)
            images, labels = images[keep], labels[keep]
        if r.outputs is not None:
            labels = r.outputs[1][labels]
        copy = _HostCopy(r.results(images, labels), r.pinned[b % 2])
        if pending is not None:
            r.write(pending)
        pending = (rows, ok, targets, copy)
    if pending is not None:
        r.write(pending)


def steady_rate(clock):
    """Images/s between the first and the last batch written (without the start-up: workers, first
    kernels), or None with fewer than three batches. clock: [(time, rows written so far)] per batch."""
    if len(clock) < 3 or clock[-1][0] <= clock[0][0]:
        return None
    return (clock[-1][1] - clock[0][1]) / (clock[-1][0] - clock[0][0])


def _layout(n, conv, folder, info, ps):
    """(chunk_size, num_chunks, info with the row layout, {array: (shape, dtype)}) of a store of ``n`` rows."""
    chunk_size = ps.chunk_size
    if chunk_size is None:  # keep the chunking of an unfinished store, so its finished chunks count
        existing = Store.peek(folder)
        chunk_size = existing["chunk_size"] if existing else default_chunk_size(ps.batch_size)
    num_chunks = math.ceil(n / chunk_size)
    info = dict(info, num_images=n, chunk_size=chunk_size, num_chunks=num_chunks, batch_size=ps.batch_size)
    c_out, c_in, kh, kw = conv.weight.shape
    shapes = {"attributions": ((n, c_out), np.float16), "targets": ((n,), np.int64),
              "predictions": ((n,), np.int64), "patch_sums": ((n, c_in, kh, kw), np.float32)}
    return chunk_size, num_chunks, info, shapes


def _stop(lock, message):
    if lock:
        lock.release()
    raise UserError(message)


def row_names(ds, class_outputs=None):
    """One string per row of the store: the image's path below the split's folder and the label stored for it
    (the class folder's index, or its model output with ``class_outputs``); hashed per chunk, they tell which
    finished chunks a rerun on changed data can keep (``Store.restart_on_new_data``)."""
    root = os.path.join(ds.root, "")
    cut = len(root)  # ImageFolder's paths start with the root: cutting it is relpath's answer, 100x faster
    return [f"{path[cut:] if path.startswith(root) else os.path.relpath(path, ds.root)}\t"
            f"{y if class_outputs is None else class_outputs[y]}" for path, y in ds.samples]


def _open_store(folder, info, shapes, allow_mixed_numerics, rank, ds=None, class_outputs=None, log=print):
    """(store, status, lock): rank 0 takes the lock and creates or checks the store (an unfinished store whose
    data changed keeps its chunks of unchanged images, given ``ds``), every rank learns the outcome and checks
    that it sees the same images, model and layer as the manifest rank 0 wrote."""
    lock = store = status = None
    error = None
    if rank == 0:
        try:
            complete = (Store.peek(folder) or {}).get("complete")
            if not complete:  # a complete store is only read: no lock
                lock = Store.lock(folder)
            names = None if ds is None or complete else row_names(ds, class_outputs)
            store, status = Store.create_or_resume(folder, info, shapes, allow_mixed_numerics, names, log)
        except UserError as e:
            error = str(e)
    error, status = distributed.from_rank0((error, status))
    if error:
        _stop(lock, error if rank == 0 else f"rank 0 stopped: {error}")
    if rank != 0:
        store = Store(folder, None)
    store.reload_manifest()
    mine = None
    diff = describe_mismatch(store.manifest, info, COMPLETE_KEYS if status == "complete" else RESUME_KEYS)
    if diff:
        mine = f"rank {rank} differs from the store's manifest: {diff}"
    elif (store.manifest.get("numerics") != info.get("numerics") and not allow_mixed_numerics
          and status != "complete"):
        mine = (f"rank {rank} would use other numerics than the store records "
                f"({store.manifest.get('numerics')} vs {info.get('numerics')}); pass --allow_mixed_numerics "
                f"to allow it")
    error = distributed.first_error(mine)
    if error:
        _stop(lock, f"{error} (nothing was written)")
    return store, status, lock


def _my_batches(store, n, chunk_size, num_chunks, batch_size):
    """(chunks done before, this rank's batches): the unfinished chunks as rank 0 sees them, dealt round-robin
    to the ranks, cut into batches of row indices."""
    rank, size = distributed.world()[:2]
    done_before = distributed.from_rank0(sorted(store.done_chunks()) if rank == 0 else None)
    todo_all = [i for i in range(num_chunks) if i not in set(done_before)]
    batches = []
    for i in todo_all[rank::size]:
        batches += folders.batches_of(list(range(i * chunk_size, min((i + 1) * chunk_size, n))), batch_size)
    return done_before, batches


def _run_batches(model, conv, ds, ps, chunks, batches):
    """Compute this process's batches into ``chunks`` under a progress bar. Returns the _Rows (its clock)."""
    rank, size = distributed.world()[:2]
    model = model.to(ps.device)
    if ps.channels_last:
        model = model.to(memory_format=torch.channels_last)
    hint = (": replace or remove the file, or pass --skip_unreadable to record it as unreadable and go on "
            "(finished chunks are kept: rerun to resume)")
    # unreadable images come through as label UNREADABLE: the loop decides, after saving what is finished
    loader = folders.make_loader(ds, batches, ps.num_workers, ps.device, "keep", hint) if batches else []
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", unit_scale=True, smoothing=0.05,
               disable=(rank != 0 and size > 1), desc="stage 1" + (f" rank {rank}" if size > 1 else ""),
               dynamic_ncols=True)
    r = _Rows(model, conv, ds, ps, chunks, bar)
    source = loader
    try:
        with deterministic_algorithms(ps.device, ps.deterministic):
            if ps.gpu_decoder is not None and batches:  # decoding of batch b + 1 overlaps batch b's compute
                source = overlap.Prefetch(loader, ps.gpu_decoder.decode_batch, overlap.streams_for(ps.device))
            _compute(r, batches, source, loader)
    finally:
        if source is not loader:
            source.close()  # stops the decoding thread
        bar.close()  # the bar's line ends before any error message
    if chunks.open:
        raise RuntimeError(f"chunks {sorted(chunks.open)} were left incomplete")
    return r


def _merge(store, lock, ds, folder, num_chunks, finished):
    """Rank 0: merge every chunk into the arrays and mark the store complete, with the file names of the
    unreadable rows in its manifest."""
    missing = [i for i in range(num_chunks) if i not in finished and i not in store.done_chunks()]
    if missing:
        _stop(lock, f"{len(missing)} chunks of {folder} are not done (first: {missing[0]}); "
                    f"rerun the same command to finish them")
    store.merge_chunks(progress=lambda it: tqdm(it, desc="merging chunks", unit="chunk", dynamic_ncols=True,
                                                disable=len(it) < 8))
    bad_rows = np.flatnonzero(np.asarray(store.array("predictions")) == UNREADABLE_PREDICTION)
    store.finish(num_chunks, [folders.relative_name(ds, int(r)) for r in bad_rows])


def _done_line(images_all, secs, clock, size):
    """The closing line: images, seconds, images/s (and after the first batch, on one process)."""
    steady = steady_rate(clock) if size == 1 else None
    return (f"done: {images_all} images in {secs:.1f} s ({images_all / max(secs, 1e-9):.1f} images/s"
            + (f"; {steady:.1f} images/s after the first batch" if steady else "") + ")")


def run_stage1(model, conv, ds, folder, info, ps, log=print):
    """Fill (or finish) the store at ``folder`` with the rows of ``ds``; ``ps``: PassSettings. Returns the Store.

    ``info``: the store fingerprint (see store.fingerprint) plus autocast/decode settings and ``numerics``.
    Several processes (torchrun): every rank calls this; rank 0 alone takes the store's lock, creates or
    checks the store and merges the chunks; the ranks agree on each step through the process group.
    """
    rank, size = distributed.world()[:2]
    n = len(ds)
    chunk_size, num_chunks, info, shapes = _layout(n, conv, folder, info, ps)
    store, status, lock = _open_store(folder, info, shapes, ps.allow_mixed_numerics, rank, ds, ps.class_outputs, log)
    if status == "complete":
        if rank == 0:
            log(f"store {folder} is already complete ({n} images): nothing to do")
        distributed.barrier()
        return store
    done_before, batches = _my_batches(store, n, chunk_size, num_chunks, ps.batch_size)
    if rank == 0:
        verb = "resuming" if status == "resume" else "writing"
        log(f"{verb} {folder}: {n} images in {num_chunks} chunks of {chunk_size}"
            + (f", {len(done_before)} chunks already done" if done_before else "")
            + (f", {size} processes" if size > 1 else ""))
    chunks = _ChunkBuffer(store, chunk_size, n, shapes)
    r = _run_batches(model, conv, ds, ps, chunks, batches)
    # the ranks agree on the finished chunks through the process group (files are only the fallback)
    finished = set(done_before).union(*distributed.gather(chunks.saved))
    images_all = sum(distributed.gather(sum(len(b) for b in batches)))
    if rank == 0:
        _merge(store, lock, ds, folder, num_chunks, finished)
        secs = time.time() - r.start
        if images_all:
            log(_done_line(images_all, secs, r.clock, size))
        bad = store.manifest["unreadable"]
        if bad:
            log(f"{len(bad)} unreadable images recorded as invalid rows (prediction -1; file names in "
                f"the manifest's 'unreadable'): " + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
        lock.release()
    distributed.barrier()
    return store
