"""Stage-2 math: histograms, used classes, class means, closed-form ARVs, cosines and the candidate list,
against a plain-Python loop implementation of docs/method.md ('Attribution and importance'
to 'Candidates: the cosine rule') run on the same arrays."""
import math

import numpy as np
import pytest
import torch

from utils.method import similarities
from utils.stages import stage2_passes


# ---------------------------------------------------------------------------- the reference (loops only)

def loop_reference(A, targets, P, W, K, tau, p, low, high):
    """docs/method.md's definitions with explicit loops over images, channels, classes and input channels.

    A: (N, C) attributions; targets: (N,); P: (N, C_in, kh, kw) patch sums; W: (C, C_in, kh, kw).
    A class without images has no ARV and is never used.
    """
    A = np.asarray(A)
    P = np.asarray(P)
    W = np.asarray(W, dtype=np.float64)
    N, C = A.shape
    _, C_in, kh, kw = P.shape
    H = [[0] * C for _ in range(K)]
    counts = [0] * K
    for n in range(N):
        y = int(targets[n])
        counts[y] += 1
        total = 0.0
        for c in range(C):
            total += max(float(A[n, c]), 0.0)
        for c in range(C):
            if float(A[n, c]) >= tau * total:
                H[y][c] += 1
    used = [[counts[y] > 0 and H[y][c] >= p * counts[y] for c in range(C)] for y in range(K)]

    means = np.zeros((K, C_in, kh, kw))
    for n in range(N):
        y = int(targets[n])
        for k in range(C_in):
            for i in range(kh):
                for j in range(kw):
                    means[y, k, i, j] += float(P[n, k, i, j])
    for y in range(K):
        if counts[y]:
            means[y] /= counts[y]

    def arv(c, y):
        r = []
        for k in range(C_in):
            s = 0.0
            for i in range(kh):
                for j in range(kw):
                    s += W[c, k, i, j] * means[y, k, i, j]
            r.append(s)
        return r

    def cosine(u, v):
        nu = math.sqrt(sum(t * t for t in u))
        nv = math.sqrt(sum(t * t for t in v))
        if nu == 0 or nv == 0:
            return None
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    cands = []
    for c in range(C):
        for y1 in range(K):
            for y2 in range(y1 + 1, K):
                if not (used[y1][c] and used[y2][c]):
                    continue
                cs = cosine(arv(c, y1), arv(c, y2))
                if cs is not None and low <= cs < high:
                    cands.append({"channel": c, "class1": y1, "class2": y2, "cosine_similarity": cs})
    cands.sort(key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))
    return H, counts, used, means, cands


def implementation(A, targets, P, W, K, tau, p, low, high, chunk_rows=similarities.DEFAULT_CHUNK_ROWS):
    hist = stage2_passes.class_histogram(A, targets, K, tau, chunk_rows=chunk_rows)
    counts = similarities.class_counts(targets, K)
    used = similarities.used_classes(hist, counts, p)
    means = stage2_passes.class_mean_patch_sums(P, targets, K, chunk_rows=chunk_rows)
    cands = similarities.candidate_pairs(torch.as_tensor(W), means, used, low, high)
    return hist, counts, used, means, cands


def assert_same_candidates(got, expect):
    assert [(d["channel"], d["class1"], d["class2"]) for d in got] == \
        [(d["channel"], d["class1"], d["class2"]) for d in expect]
    for g, e in zip(got, expect):
        assert set(g) == {"channel", "class1", "class2", "cosine_similarity"}
        assert all(type(g[k]) is int for k in ("channel", "class1", "class2"))
        assert g["cosine_similarity"] == pytest.approx(e["cosine_similarity"], abs=1e-12)


def random_problem(seed=0, N=45, C=7, C_in=5, kh=2, kw=2, K=5, empty_class=4):
    """Random arrays with class structure in the attributions, so channels use several classes;
    class ``empty_class`` has no images; channel 2 has an all-zero filter (zero ARVs)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, K - 1, size=N)
    targets[targets >= empty_class] += 1  # no image has label empty_class
    base = rng.normal(size=(K, C)) * 3
    A = (base[targets] + rng.normal(size=(N, C))).astype(np.float16)
    P = rng.normal(size=(N, C_in, kh, kw)).astype(np.float32) + rng.normal(size=(K, C_in, kh, kw))[targets].astype(np.float32)
    W = rng.normal(size=(C, C_in, kh, kw)).astype(np.float32)
    W[2] = 0.0
    return A, targets, P, W, K


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("tau,p,low,high", [(0.05, 0.5, -0.3, 0.6), (0.03, 0.75, 0.0, 0.5),
                                            (0.1, 0.0, -1.0, 1.01), (0.0, 0.3, 0.2, 1.0)])
def test_stage2_equals_loop_reference(tau, p, low, high):
    A, targets, P, W, K = random_problem()
    H, counts, used, means, cands = loop_reference(A, targets, P, W, K, tau, p, low, high)
    hist, counts_t, used_t, means_t, cands_t = implementation(A, targets, P, W, K, tau, p, low, high)

    assert hist.dtype == torch.int64 and hist.tolist() == H
    assert counts_t.tolist() == counts
    assert counts[4] == 0
    assert used_t.tolist() == used
    assert not used_t[4].any()  # the class without images is never used, even with p = 0
    assert torch.equal(hist[4], torch.zeros_like(hist[4]))
    np.testing.assert_allclose(means_t.numpy(), means, rtol=1e-12, atol=1e-12)
    assert len(cands) > 0
    assert_same_candidates(cands_t, cands)
    assert all(not math.isnan(d["cosine_similarity"]) for d in cands_t)
    assert all(d["channel"] != 2 for d in cands_t)  # zero filter: no cosine, left out
    poly = [c for c in range(A.shape[1]) if sum(used[y][c] for y in range(K)) >= 2]
    assert similarities.polysemantic_channels(used_t) == poly


def test_reference_problem_is_not_trivial():
    """The random problem exercises what it should: candidates both kept and dropped by the window,
    and the zero-filter channel uses two classes (so only the NaN rule removes it)."""
    A, targets, P, W, K = random_problem()
    _, _, used, _, cands_all = loop_reference(A, targets, P, W, K, 0.05, 0.5, -2.0, 2.0)
    _, _, _, _, cands_win = loop_reference(A, targets, P, W, K, 0.05, 0.5, -0.3, 0.6)
    assert len(cands_all) > len(cands_win) > 0
    assert sum(used[y][2] for y in range(K)) >= 2
    # the implementation with a window of everything leaves out exactly the zero-ARV pairs
    _, _, used_t, _, cands_t = implementation(A, targets, P, W, K, 0.05, 0.5, -2.0, 2.0)
    assert_same_candidates(cands_t, cands_all)


def test_half_open_interval_and_zero_arv():
    """Exactly representable cosines 0 and 0.5: low <= cos is kept, cos == high is dropped."""
    # 1x1 conv with 4 inputs; per-image patch sums average to
    # class 0: [1,0,0,0], class 1: [1,1,1,1], class 2: [0,1,0,0], class 3: [0,0,0,0] (zero ARV)
    P = np.array([[2, 0, 0, 0], [0, 0, 0, 0],
                  [1, 1, 1, 1], [1, 1, 1, 1],
                  [0, 1, 0, 0],
                  [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)[:, :, None, None]
    targets = np.array([0, 0, 1, 1, 2, 3, 3])
    W = np.stack([np.ones(4), 2 * np.ones(4)]).astype(np.float32)[:, :, None, None]
    A = np.ones((7, 2), dtype=np.float16)  # every channel important for every image: all classes used
    K = 4

    def pairs(low, high):
        _, _, used_t, _, got = implementation(A, targets, P, W, K, 0.1, 0.75, low, high)
        assert used_t.all()
        _, _, _, _, ref = loop_reference(A, targets, P, W, K, 0.1, 0.75, low, high)
        assert_same_candidates(got, ref)
        return [(d["channel"], d["class1"], d["class2"], d["cosine_similarity"]) for d in got]

    # cos(0,1) = 1/(1*2) = 0.5, cos(1,2) = 0.5, cos(0,2) = 0; class 3 has a zero ARV (no cosine)
    assert pairs(0.0, 0.5) == [(0, 0, 2, 0.0), (1, 0, 2, 0.0)]
    assert pairs(0.5, 0.75) == [(0, 0, 1, 0.5), (0, 1, 2, 0.5), (1, 0, 1, 0.5), (1, 1, 2, 0.5)]
    assert pairs(-1.0, 2.0) == [(0, 0, 1, 0.5), (0, 1, 2, 0.5), (1, 0, 1, 0.5), (1, 1, 2, 0.5),
                                (0, 0, 2, 0.0), (1, 0, 2, 0.0)]
    assert pairs(0.0, 0.0) == []
    assert pairs(1e-12, 0.4999999) == []
    cos = similarities.cosine_matrix(torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 1], [0.0, 0, 0, 0]]))
    assert float(cos[0, 1]) == 0.5
    assert torch.isnan(cos[2]).all() and torch.isnan(cos[:, 2]).all()


def test_chunking_and_memmapped_float16_give_the_same_result(tmp_path):
    A, targets, P, W, K = random_problem(seed=1, N=37)
    tau, p, low, high = 0.05, 0.5, -0.5, 0.9
    one = implementation(A, targets, P, W, K, tau, p, low, high)
    ref = loop_reference(A, targets, P, W, K, tau, p, low, high)
    np.save(tmp_path / "attributions.npy", A)
    np.save(tmp_path / "targets.npy", targets)
    np.save(tmp_path / "patch_sums.npy", P)
    A_m = np.load(tmp_path / "attributions.npy", mmap_mode="r")
    t_m = np.load(tmp_path / "targets.npy", mmap_mode="r")
    P_m = np.load(tmp_path / "patch_sums.npy", mmap_mode="r")
    assert isinstance(A_m, np.memmap) and A_m.dtype == np.float16
    for chunk_rows, arrays in ((5, (A, targets, P)), (36, (A, targets, P)), (37, (A_m, t_m, P_m)),
                               (4, (A_m, t_m, P_m))):
        got = implementation(arrays[0], arrays[1], arrays[2], W, K, tau, p, low, high, chunk_rows=chunk_rows)
        assert torch.equal(got[0], one[0])  # histograms: exactly equal
        assert torch.equal(got[1], one[1]) and torch.equal(got[2], one[2])
        torch.testing.assert_close(got[3], one[3], rtol=1e-13, atol=1e-13)
        assert_same_candidates(got[4], one[4])
        assert_same_candidates(got[4], ref[4])
    assert len(one[4]) > 0


def test_rows_mean_patch_sums_and_concept_arv_against_loop(tmp_path):
    """A concept of several classes: v = ARV averaged over all training images of its classes."""
    A, targets, P, W, K = random_problem(seed=2, N=30)
    np.save(tmp_path / "patch_sums.npy", P)
    P_m = np.load(tmp_path / "patch_sums.npy", mmap_mode="r")
    classes = [0, 3]
    rows = [n for n in range(len(targets)) if targets[n] in classes]
    c = 5
    # loop: the mean over the rows of each image's ARV r_n^c[k] = sum_ij W[c,k,i,j] P_n[k,i,j]
    expect = np.zeros(P.shape[1])
    for n in rows:
        for k in range(P.shape[1]):
            for i in range(P.shape[2]):
                for j in range(P.shape[3]):
                    expect[k] += float(W[c, k, i, j]) * float(P[n, k, i, j])
    expect /= len(rows)
    for chunk_rows in (3, 1000):
        mean = similarities.rows_mean_patch_sums(P_m, rows, chunk_rows=chunk_rows)
        assert mean.dtype == torch.float64
        got = similarities.arv(torch.from_numpy(W[c]), mean)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-10, atol=1e-10)
    # one class: equals that class's mean from class_mean_patch_sums
    means = stage2_passes.class_mean_patch_sums(P, targets, K)
    rows0 = [n for n in range(len(targets)) if targets[n] == 0]
    torch.testing.assert_close(similarities.rows_mean_patch_sums(P, rows0), means[0], rtol=1e-13, atol=1e-13)


def test_cosine_in_float64_does_not_overflow():
    """A large ARV (norm far above 256, where the published float16 cosine gives NaN) keeps its pair."""
    P = np.array([[3000.0, 0.0], [2000.0, 2000.0]], dtype=np.float32)[:, :, None, None]
    W = np.ones((1, 2, 1, 1), dtype=np.float32)
    A = np.ones((2, 1), dtype=np.float16)
    _, _, _, _, got = implementation(A, np.array([0, 1]), P, W, 2, 0.1, 0.5, 0.0, 1.0)
    assert len(got) == 1 and got[0]["cosine_similarity"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
