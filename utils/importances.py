"""Stage 1: one pass over the training images, writing attributions, labels, predictions and patch sums.

The rows are cut into fixed chunks; each finished chunk is flushed to disk and marked, so an
interrupted run resumes at the first unfinished chunk and ends with the same arrays as an
uninterrupted one. Under torchrun, rank r takes chunks r, r + world, r + 2*world, ...
"""
import collections
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from . import attribution, data, distributed
from .store import Store


def stage1_batch(model, conv, images, labels, autocast_dtype=None):
    """Attributions, predictions and patch sums of one batch.

    images: (B, 3, H, W) on the model's device; labels: (B,) long.
    Returns A (B, C_out) float16, predictions (B,) long, P (B, C_in, kh, kw) float32, all on CPU.
    """
    x, a, g, logits = attribution.logits_and_layer_grad(model, conv, images, labels, autocast_dtype)
    A = attribution.channel_attribution(a, g)
    P = attribution.conv_patch_sums(x, conv)
    return A.half().cpu(), logits.argmax(dim=1).cpu(), P.cpu()


def default_chunk_size(batch_size, target=2048):
    """Rows per resumable chunk: a multiple of the batch size near ``target``."""
    return batch_size * max(1, target // batch_size)


def run_stage1(model, conv, ds, folder, info, batch_size, device, num_workers, chunk_size,
               autocast_dtype=None, channels_last=False, gpu_decoder=None, log=print):
    """Fill (or finish) the store at ``folder``. Returns the Store.

    ``info``: the store fingerprint (see store.fingerprint) plus autocast/decode settings.
    ``chunk_size``: rows per resumable chunk; None keeps an existing store's, else default_chunk_size.
    ``gpu_decoder``: optional callable turning a loader batch into (images, labels) on the device.
    """
    rank, size = distributed.world()[:2]
    n = len(ds)
    if chunk_size is None:  # keep the chunking of an unfinished store, so its finished chunks count
        existing = Store.peek(folder)
        chunk_size = existing["chunk_size"] if existing else default_chunk_size(batch_size)
    num_chunks = math.ceil(n / chunk_size)
    info = dict(info, num_images=n, chunk_size=chunk_size, num_chunks=num_chunks, batch_size=batch_size)
    c_out, c_in, kh, kw = conv.weight.shape
    shapes = {"attributions": ((n, c_out), np.float16), "targets": ((n,), np.int64),
              "predictions": ((n,), np.int64), "patch_sums": ((n, c_in, kh, kw), np.float32)}
    store, status = Store.create_or_resume(folder, info, shapes, is_main=(rank == 0))
    # counted before the barrier, while no process has started writing: all ranks' finished chunks
    done_before = sum(store.chunk_done(i) for i in range(num_chunks)) if status == "resume" else 0
    distributed.barrier()
    if status == "complete":
        if rank == 0:
            log(f"store {folder} is already complete ({n} images): nothing to do")
        return store
    if rank != 0:
        store.reload_manifest()

    todo = [i for i in range(rank, num_chunks, size) if not store.chunk_done(i)]
    if rank == 0:
        verb = "resuming" if status == "resume" else "writing"
        log(f"{verb} {folder}: {n} images in {num_chunks} chunks of {chunk_size}"
            + (f", {done_before} chunks already done" if done_before else "")
            + (f", {size} processes" if size > 1 else ""))
    batches, chunk_of_batch = [], []
    for i in todo:
        rows = list(range(i * chunk_size, min((i + 1) * chunk_size, n)))
        for b in data.batches_of(rows, batch_size):
            batches.append(b)
            chunk_of_batch.append(i)
    remaining = collections.Counter(chunk_of_batch)

    writer = store.row_writer(list(shapes))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images_todo = sum(len(b) for b in batches)
    loader = data.make_loader(ds, batches, num_workers, device) if batches else []
    bar = tqdm(total=images_todo, unit="img", unit_scale=True, smoothing=0.05, disable=(rank != 0 and size > 1),
               desc="stage 1" + (f" rank {rank}" if size > 1 else ""), dynamic_ncols=True)
    start = time.time()
    for b, (batch, chunk) in enumerate(zip(loader, chunk_of_batch)):
        if gpu_decoder is not None:
            images, labels = gpu_decoder(batch)
        else:
            images, labels = batch
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        A, pred, P = stage1_batch(model, conv, images, labels, autocast_dtype)
        lo = batches[b][0]
        writer.write("attributions", lo, A.numpy())
        writer.write("targets", lo, labels.cpu().numpy())
        writer.write("predictions", lo, pred.numpy())
        writer.write("patch_sums", lo, P.numpy())
        remaining[chunk] -= 1
        if remaining[chunk] == 0:
            writer.sync()
            store.mark_chunk_done(chunk)
        bar.update(len(batches[b]))
    bar.close()
    writer.close()
    images_all = distributed.sum_over_ranks(images_todo, device)
    if rank == 0:
        store.finish(num_chunks)
        secs = time.time() - start
        if images_all:
            log(f"done: {images_all} images in {secs:.1f} s ({images_all / max(secs, 1e-9):.1f} images/s)")
    distributed.barrier()
    return store
