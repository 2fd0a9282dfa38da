"""Stage 2: class histograms, used classes, closed-form activation relevance vectors, cosines.

Everything reads the stage-1 arrays in chunks of rows, so a 1.28 M x 2048 store needs a few
hundred MB of RAM, and no model pass is made: the ARV of channel c for class y is
R_y^c[k] = sum_{i,j} W[c,k,i,j] * Pbar_y[k,i,j], with Pbar_y the class mean of the patch sums.

The same patch sums give each image's summed activation of every channel, S_n[c] = sum_{h,w} a_n[c,h,w]
= sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] H'W' (H' x W' the layer's output size), and, because an
eval-mode BatchNorm is one affine map per channel applied at every position, the summed activation
after a BatchNorm that follows the layer: sum_{h,w} BN(a_n)[c,h,w] = scale[c] S_n[c] + shift[c] H'W'.
``--importance_sign positive_activation`` counts image n for channel c only where that sum is positive
(``sign_histograms``): in the ResNet layout a positive attribution also comes from a channel that is
*less* active than usual (negative activation x negative gradient), and the published rule counts it.
"""
import mmap

import numpy as np
import torch
from tqdm import tqdm

from utils.method.attribution import important_channels

DEFAULT_CHUNK_ROWS = 16384  # about 0.7 GB of working memory for 2048 channels (measured: benchmarks/stage2_memory.py)


def _chunks(n, chunk_rows):
    return [(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]


def read_rows(array, lo, hi):
    """Rows lo .. hi-1 of ``array`` as an in-memory numpy array.

    A memory map of a whole C-ordered ``.npy`` file, as ``numpy.load(..., mmap_mode='r')`` returns it,
    is read with a plain file read instead of through the mapping: the pages read then stay in the
    page cache only and are not mapped into this process, whose resident memory is the chunk being
    worked on rather than all of the file read so far. Anything else is sliced.
    """
    if (isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
            and getattr(array, "filename", None)):
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        out = np.fromfile(array.filename, dtype=array.dtype, count=(hi - lo) * row,
                          offset=array.offset + lo * row * array.dtype.itemsize)
        return out.reshape((hi - lo,) + tuple(array.shape[1:]))
    return np.asarray(array[lo:hi])


def class_histogram(attributions, targets, num_classes, tau, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """H[y, c] = number of images of class y for which channel c is important.

    attributions: (N, C) array-like (memory-mapped float16 is fine); targets: (N,) ints, rows with a
    negative target (unreadable images, see Store.labels) are left out. Returns (num_classes, C) int64 tensor.
    """
    n, c = attributions.shape
    hist = torch.zeros(num_classes, c, dtype=torch.int64)
    for lo, hi in tqdm(_chunks(n, chunk_rows), desc="histograms", disable=not progress, unit="chunk"):
        A = torch.from_numpy(read_rows(attributions, lo, hi).astype(np.float32))
        y = torch.from_numpy(read_rows(targets, lo, hi).astype(np.int64))
        ok = y >= 0
        hist.index_add_(0, y[ok], important_channels(A[ok], tau).to(torch.int64))
    return hist


def _float64(a):
    """A float64 tensor of a tensor (detached) or array-like (a read-only memory map is copied, never wrapped)."""
    if torch.is_tensor(a):
        return a.detach().to(torch.float64)
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.array(a, dtype=np.float64))
    return torch.as_tensor(a).to(torch.float64)


def summed_activation(patch_sums, weight, bias=None, positions=1):
    """S[n, c] = sum_{h,w} a_n[c,h,w] = sum_{k,i,j} W[c,k,i,j] P_n[k,i,j] + b[c] * H'W', from the patch sums.

    patch_sums: (N, C_in, kh, kw); weight: (C_out, C_in, kh, kw) (or the channels wanted); bias: (C_out,) or
    None; positions: H' * W', the number of output positions of the layer. Tensors or array-likes.
    Returns (N, C_out) float64.
    """
    s = _float64(patch_sums).flatten(1) @ _float64(weight).flatten(1).T
    if bias is not None:
        s = s + _float64(bias) * positions
    return s


def affine_summed(s, scale, shift, positions):
    """sum_{h,w} BN(a)[n,c] = scale[c] * S[n,c] + shift[c] * H'W' for BN(a) = scale * a + shift at each position.

    s: (N, C) summed activations (``summed_activation``); scale, shift: (C,) (``models.batchnorm_affine``).
    Returns (N, C) float64.
    """
    return s.to(torch.float64) * scale.detach().to(torch.float64) + shift.detach().to(torch.float64) * positions


def sign_histograms(attributions, targets, patch_sums, num_classes, tau, weight, bias=None, positions=1,
                    affine=None, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """Class histograms of the published importance rule and of the sign-aware one, from one read of the store.

    attributions: (N, C) and patch_sums: (N, C_in, kh, kw) array-likes (memory maps are fine); targets: (N,)
    (negative: row left out); weight, bias, positions: the layer (``summed_activation``); affine: (scale, shift)
    of the BatchNorm that follows the layer, or None (then the layer's own summed activation decides).
    Returns a dict of (num_classes, C) int64 tensors, H[y, c] = images of class y for which c is important
    ('published', the same as ``class_histogram``) and moreover
      'positive_activation': the summed activation after the BatchNorm (or the layer's, without one) is > 0;
      'negative_layer_activation': the layer's own summed activation S (before any BatchNorm) is < 0.
    """
    n, c = attributions.shape
    names = ("published", "positive_activation", "negative_layer_activation")
    hists = {k: torch.zeros(num_classes, c, dtype=torch.int64) for k in names}
    for lo, hi in tqdm(_chunks(n, chunk_rows), desc="histograms", disable=not progress, unit="chunk"):
        A = torch.from_numpy(read_rows(attributions, lo, hi).astype(np.float32))
        y = torch.from_numpy(read_rows(targets, lo, hi).astype(np.int64))
        ok = y >= 0
        s = summed_activation(torch.from_numpy(read_rows(patch_sums, lo, hi)[ok.numpy()]), weight, bias, positions)
        after = s if affine is None else affine_summed(s, affine[0], affine[1], positions)
        imp = important_channels(A[ok], tau)
        for k, mask in zip(names, (imp, imp & (after > 0), imp & (s < 0))):
            hists[k].index_add_(0, y[ok], mask.to(torch.int64))
    return hists


def class_counts(targets, num_classes):
    """N_y: (num_classes,) int64 tensor of images per class (negative targets are not counted)."""
    y = np.array(targets, dtype=np.int64)
    return torch.bincount(torch.from_numpy(y[y >= 0]), minlength=num_classes)


def used_classes(hist, counts, p):
    """Boolean (K, C): channel c uses class y if H[y, c] >= p * N_y (classes without images never count)."""
    counts = counts.to(torch.float64)[:, None]
    return (hist.to(torch.float64) >= p * counts) & (counts > 0)


def class_mean_patch_sums(patch_sums, targets, num_classes, chunk_rows=DEFAULT_CHUNK_ROWS, progress=False):
    """Pbar[y] = mean of P_n over the images of class y, accumulated in float64.

    patch_sums: (N, C_in, kh, kw) array-like; targets: (N,) (negative: row left out).
    Returns (K, C_in, kh, kw) float64 tensor (zeros for classes without images).
    """
    n = patch_sums.shape[0]
    shape = tuple(patch_sums.shape[1:])
    total = torch.zeros((num_classes,) + shape, dtype=torch.float64)
    for lo, hi in tqdm(_chunks(n, chunk_rows), desc="class means", disable=not progress, unit="chunk"):
        P = torch.from_numpy(read_rows(patch_sums, lo, hi).astype(np.float64))
        y = torch.from_numpy(read_rows(targets, lo, hi).astype(np.int64))
        ok = y >= 0
        total.index_add_(0, y[ok], P[ok])
    counts = class_counts(targets, num_classes).to(torch.float64).clamp_min(1)
    return total / counts.view((-1,) + (1,) * len(shape))


def rows_mean_patch_sums(patch_sums, rows, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Mean of P_n over the given rows (e.g. all training images of a concept's classes), float64.

    patch_sums: (N, C_in, kh, kw) array-like; rows: sorted list of row indices. Returns (C_in, kh, kw).
    """
    rows = np.asarray(rows, dtype=np.int64)
    total = torch.zeros(tuple(patch_sums.shape[1:]), dtype=torch.float64)
    for lo in range(0, len(rows), chunk_rows):
        part = np.asarray(patch_sums[rows[lo:lo + chunk_rows]], dtype=np.float64)
        total += torch.from_numpy(part).sum(dim=0)
    return total / max(len(rows), 1)


def arv(weight_c, mean_patch_sums):
    """Activation relevance vectors of one channel in closed form.

    weight_c: (C_in, kh, kw) filter of channel c; mean_patch_sums: (..., C_in, kh, kw).
    Returns (..., C_in) float64: r[k] = sum_{i,j} W[c,k,i,j] * P[k,i,j].
    """
    return (mean_patch_sums.to(torch.float64) * weight_c.to(torch.float64)).sum(dim=(-2, -1))


def cosine_matrix(vectors):
    """Pairwise cosine similarity of the rows of ``vectors`` (m, d) -> (m, m); NaN where a norm is 0."""
    v = vectors.to(torch.float64)
    norms = v.norm(dim=1)
    cos = (v @ v.T) / (norms[:, None] * norms[None, :])
    return torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))


def candidate_pairs(weight, class_means, used, low, high, progress=False):
    """All gamma-polysemantic candidates (c, y1, y2): y1 < y2 both used by c, low <= cos < high.

    weight: (C_out, C_in, kh, kw); class_means: (K, C_in, kh, kw); used: (K, C_out) bool.
    Returns a list of dicts {'channel', 'class1', 'class2', 'cosine_similarity'} sorted by cosine,
    highest first (ties by channel, class1, class2). Pairs with a zero ARV have no cosine and are left out.
    """
    out = []
    for c in tqdm(range(weight.shape[0]), desc="cosines", disable=not progress, unit="ch"):
        ys = torch.nonzero(used[:, c]).flatten()
        if len(ys) < 2:
            continue
        cos = cosine_matrix(arv(weight[c], class_means[ys]))
        i, j = torch.triu_indices(len(ys), len(ys), offset=1)
        vals = cos[i, j]
        keep = (vals >= low) & (vals < high)
        for a, b, v in zip(ys[i[keep]].tolist(), ys[j[keep]].tolist(), vals[keep].tolist()):
            out.append({"channel": c, "class1": a, "class2": b, "cosine_similarity": v})
    out.sort(key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))
    return out


def polysemantic_channels(used):
    """Channels that use at least two classes: the only ones that can give candidates. (K, C) -> list."""
    return torch.nonzero(used.sum(dim=0) >= 2).flatten().tolist()
