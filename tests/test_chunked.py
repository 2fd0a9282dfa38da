"""Chunked stage 2 (small chunk_rows, memory-mapped store, chunks read with file reads) equals the
unchunked computation (chunk_rows >= N, in-memory arrays): histograms, class means, candidate list."""
import numpy as np
import pytest
import torch

from utils.files.rows import read_rows
from utils.method import similarities
from utils.stages import stage2_passes

N, C_OUT, C_IN, K = 997, 24, 10, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small random store as stage 1 writes it (plain .npy files), plus the layer's weight."""
    rng = np.random.default_rng(7)
    targets = np.sort(rng.integers(0, K - 1, N))  # class K-1 has no images
    A = (rng.standard_normal((N, C_OUT)) * 0.3).astype(np.float32)
    hot = rng.integers(0, C_OUT, (K, 4))
    for y in range(K):
        rows = np.flatnonzero(targets == y)
        A[np.ix_(rows, hot[y])] += 2.0 * (rng.random((len(rows), 4)) < 0.9)
    A = A.astype(np.float16)
    P = (np.abs(rng.standard_normal((N, C_IN, 3, 3))) + (rng.random((K, C_IN, 3, 3)) * 3)[targets]).astype(np.float32)
    W = torch.from_numpy(rng.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32))
    folder = tmp_path_factory.mktemp("store")
    for name, arr in (("attributions", A), ("targets", targets.astype(np.int64)), ("patch_sums", P)):
        np.save(folder / f"{name}.npy", arr)
    mapped = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("attributions", "targets", "patch_sums")}
    return {"A": A, "targets": targets, "P": P, "W": W, "mapped": mapped}


def stage2(A, targets, P, W, chunk_rows, tau=0.05, p=0.6, low=-1.0, high=1.0):
    hist = stage2_passes.class_histogram(A, targets, K, tau, chunk_rows)
    used = similarities.used_classes(hist, similarities.class_counts(targets, K), p)
    means = stage2_passes.class_mean_patch_sums(P, targets, K, chunk_rows)
    return hist, means, similarities.candidate_pairs(W, means, used, low, high)


def test_read_rows_of_a_memory_map_equals_slicing(store):
    for name, arr in (("attributions", store["A"]), ("patch_sums", store["P"]), ("targets", store["targets"])):
        m = store["mapped"][name]
        for lo, hi in ((0, 0), (0, 5), (3, 700), (990, N)):
            got = read_rows(m, lo, hi)
            assert type(got) is np.ndarray and got.dtype == m.dtype
            np.testing.assert_array_equal(got, arr[lo:hi])
        np.testing.assert_array_equal(read_rows(m[10:], 2, 9), arr[12:19])  # a view: sliced


@pytest.mark.parametrize("chunk_rows", [3, 7, 100, 996])
def test_chunked_equals_unchunked(store, chunk_rows):
    whole = stage2(store["A"], store["targets"], store["P"], store["W"], chunk_rows=N)
    m = store["mapped"]
    chunked = stage2(m["attributions"], m["targets"], m["patch_sums"], store["W"], chunk_rows=chunk_rows)
    assert torch.equal(chunked[0], whole[0])  # histograms: integer counts
    assert int(whole[0].sum()) > 0
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=0)  # float64 sums in another order
    a, b = chunked[2], whole[2]
    assert len(a) == len(b) > 0
    assert [(d["channel"], d["class1"], d["class2"]) for d in a] == [(d["channel"], d["class1"], d["class2"]) for d in b]
    np.testing.assert_allclose([d["cosine_similarity"] for d in a], [d["cosine_similarity"] for d in b], rtol=1e-10)


def test_unchunked_matches_plain_numpy(store):
    """The unchunked result itself, against a direct numpy computation."""
    A, targets, P = store["A"].astype(np.float32), store["targets"], store["P"].astype(np.float64)
    hist, means, _ = stage2(store["A"], targets, store["P"], store["W"], chunk_rows=N)
    imp = A >= 0.05 * np.clip(A, 0, None).sum(axis=1, keepdims=True)
    for y in range(K):
        np.testing.assert_array_equal(hist[y].numpy(), imp[targets == y].sum(axis=0))
        expected = P[targets == y].mean(axis=0) if (targets == y).any() else np.zeros(P.shape[1:])
        np.testing.assert_allclose(means[y].numpy(), expected, rtol=1e-12)
