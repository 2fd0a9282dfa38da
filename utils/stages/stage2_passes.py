"""Chunked passes over the store's arrays (stage 2): class histograms and class means of the patch sums.

Each pass reads the rows in chunks of ``chunk_rows`` (utils/files/rows.py: positional reads of a memory map, so
resident memory stays at one chunk) and adds each chunk to a running total with the pure functions of
utils/method/similarities.py; ``progress=True`` shows a bar.
"""
import numpy as np
import torch
from tqdm import tqdm

from utils.files.rows import chunks, read_rows
from utils.method import similarities
from utils.method.similarities import DEFAULT_CHUNK_ROWS
from utils import finite


def _chunks_shown(n, chunk_rows, desc, progress):
    return tqdm(chunks(n, chunk_rows), desc=desc, disable=not progress, unit="chunk")


def _targets(targets, lo, hi):
    return torch.from_numpy(read_rows(targets, lo, hi).astype(np.int64))


STORE_NONFINITE = ("the store was written before stage 1 refused such numbers: rerun get_importances_for_classes.py "
                   "into a new --store_dir with finite weights")


def _attributions(attributions, lo, hi):
    a = torch.from_numpy(read_rows(attributions, lo, hi).astype(np.float32))
    finite.refuse_nonfinite(a, f"the store's attributions of rows {lo}..{hi - 1}", STORE_NONFINITE)
    return a


def _patch_sums(patch_sums, lo, hi, dtype=None):
    P = read_rows(patch_sums, lo, hi)
    P = torch.from_numpy(P if dtype is None else P.astype(dtype))
    finite.refuse_nonfinite(P, f"the store's patch sums of rows {lo}..{hi - 1}", STORE_NONFINITE)
    return P


def class_histogram(attributions, targets, num_classes, tau, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """H[y, c] = number of images of class y for which channel c is important.

    attributions: (N, C) array-like (memory-mapped float16 is fine); targets: (N,) ints, rows with a
    negative target (unreadable images, see Store.labels) are left out. Returns (num_classes, C) int64 tensor.
    """
    n, c = attributions.shape
    hist = torch.zeros(num_classes, c, dtype=torch.int64)
    for lo, hi in _chunks_shown(n, chunk_rows, "histograms", progress):
        hist = similarities.add_class_histogram(hist, _attributions(attributions, lo, hi), _targets(targets, lo, hi),
                                                tau)
    return hist


def class_histograms(attributions, targets, num_classes, taus, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """``class_histogram`` at several tau from one read of the attributions: {tau: (num_classes, C) int64}."""
    n, c = attributions.shape
    hists = {t: torch.zeros(num_classes, c, dtype=torch.int64) for t in taus}
    for lo, hi in _chunks_shown(n, chunk_rows, "histograms (grid)", progress):
        hists = similarities.add_class_histograms(hists, _attributions(attributions, lo, hi),
                                                  _targets(targets, lo, hi), taus)
    return hists


def sign_histograms(attributions, targets, patch_sums, num_classes, tau, layer, chunk_rows=DEFAULT_CHUNK_ROWS,
                    progress=False):
    """Class histograms of the published importance rule and of the sign-aware one, from one read of the store.

    attributions: (N, C) and patch_sums: (N, C_in, kh, kw) array-likes (memory maps are fine); targets: (N,)
    (negative: row left out); layer: a ``similarities.SummedLayer`` (weight (C, C_in, kh, kw), bias, positions
    and the following BatchNorm's affine map), read as ``similarities.add_sign_histograms`` does.
    Returns {name: (num_classes, C) int64} for the names of ``similarities.SIGN_HISTOGRAMS``.
    """
    n, c = attributions.shape
    hists = {k: torch.zeros(num_classes, c, dtype=torch.int64) for k in similarities.SIGN_HISTOGRAMS}
    for lo, hi in _chunks_shown(n, chunk_rows, "histograms", progress):
        P = _patch_sums(patch_sums, lo, hi)
        hists = similarities.add_sign_histograms(hists, _attributions(attributions, lo, hi), _targets(targets, lo, hi),
                                                 P, tau, layer)
    return hists


def class_mean_patch_sums(patch_sums, targets, num_classes, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """Pbar[y] = mean of P_n over the images of class y, accumulated in float64.

    patch_sums: (N, C_in, kh, kw) array-like; targets: (N,) (negative: row left out).
    Returns (K, C_in, kh, kw) float64 tensor (zeros for classes without images).
    """
    n = patch_sums.shape[0]
    total = torch.zeros((num_classes,) + tuple(patch_sums.shape[1:]), dtype=torch.float64)
    for lo, hi in _chunks_shown(n, chunk_rows, "class means", progress):
        P = _patch_sums(patch_sums, lo, hi, np.float64)
        total = similarities.add_class_sums(total, P, _targets(targets, lo, hi))
    return similarities.class_mean_of_sums(total, similarities.class_counts(targets, num_classes))


def cosines_shown(channels):
    """The progress bar of ``similarities.candidate_pairs``'s loop over the channels."""
    return tqdm(channels, desc="cosines", unit="ch")
