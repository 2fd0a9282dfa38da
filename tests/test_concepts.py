"""Label-free concepts (issue 11, point 2): summed activations and per-image ARVs from the store equal a
model pass (hooked layer output; autograd gradient x input), top-N rows (also most negative under a
BatchNorm with a negative scale), k-means on planted concepts, purity, and the command line
(``get_cosine_similarities.py --label_free``) with its refusals of bad input.
"""
import collections
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from tests import tiny_models
from tests.conftest import run_stage, tree_bytes
from tests.test_cli import load_split, run_inproc
from utils.method import attribution
from utils.files.rows import gather_rows
from utils.method import clustering
from utils.model import loading
from utils.stages import label_free
from utils.stages.label_free import TrainingRows
from utils.method.clustering import Clustering
from utils.method.similarities import SummedLayer
from utils.method import similarities

NEG = (1, 4, 9)  # channels of conv3 whose following BatchNorm gets a negative scale
MODEL = "tests.test_concepts:tiny_resnet_negbn"
TAG = "tests_test_concepts_tiny_resnet_negbn"
RUNTIME = ["--num_workers", "0", "--device", "cpu"]


def tiny_resnet_negbn():
    """tests.tiny_models.tiny_resnet with bn3's scale negated for the channels NEG (a --model factory)."""
    model = tiny_models.tiny_resnet()
    with torch.no_grad():
        model.bn3.weight[list(NEG)] *= -1
    return model


def model_pass(model, conv, images):
    """Independent reference: the layer's input x and output a (hook), s = sum_hw a, and the per-image ARVs
    of every channel by autograd, r[n, c, k] = sum_hw x[n,k] * d(sum_hw a[n,c]) / dx[n,k]."""
    rec = {}
    handle = conv.register_forward_hook(lambda m, i, o: rec.update(x=i[0].detach(), a=o.detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    x = rec["x"].clone().requires_grad_(True)
    out = conv(x)
    onehot = torch.eye(out.shape[1])[:, None, :, None, None].expand(-1, *out.shape)  # one channel's sum each
    (g,) = torch.autograd.grad(out, x, onehot, is_grads_batched=True)  # (C, N, C_in, H, W)
    r = (x.detach() * g).double().sum(dim=(3, 4)).transpose(0, 1)  # (N, C, C_in)
    return rec["x"], rec["a"].double(), rec["a"].double().sum(dim=(2, 3)), r


def save_memmap(path, array):
    np.save(path, array)
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------- closed forms vs a model pass

@pytest.mark.parametrize("kind", ["vgg", "resnet_negbn"])
def test_store_closed_forms_equal_model_pass(image_root, tmp_path, kind):
    """VGG layer: 3x3 kernel, stride 2, padding 2, dilation 2, with a bias; ResNet layer: 1x1 conv, BatchNorm
    after it with a negative scale for NEG. Patch sums made as stage 1 makes them, read back memory-mapped."""
    model = tiny_models.tiny_vgg() if kind == "vgg" else tiny_resnet_negbn()
    conv = model.features[6] if kind == "vgg" else model.conv3
    images, labels, names = load_split(image_root, "train")
    x, a, s_ref, r_ref = model_pass(model, conv, images)
    P = save_memmap(tmp_path / "patch_sums.npy", attribution.conv_patch_sums(x, conv).numpy())
    W = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()

    signs, positions, bn = loading.layer_signs_and_positions(model, conv, torch.zeros(1, 3, 224, 224))
    assert positions == a.shape[2] * a.shape[3]
    if kind == "vgg":
        assert bn is None and (signs == 1).all()
    else:
        assert bn == "bn3" and torch.nonzero(signs < 0).flatten().tolist() == list(NEG)

    s = similarities.summed_activation(np.asarray(P), W, b, positions)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5 * float(s_ref.abs().max()))
    rows = [17, 3, 3, 0, 23]
    Pr = gather_rows(P, rows)
    assert np.array_equal(Pr, np.asarray(P)[rows])
    for c in range(W.shape[0]):
        r = similarities.arv(W[c], torch.from_numpy(Pr))
        torch.testing.assert_close(r, r_ref[rows, c], rtol=1e-5, atol=1e-5 * float(r_ref[:, c].abs().max()))

    # discover: top rows by sign * s (the model pass's order), their s, and each cluster's mean ARV
    top_n, chans = 7, list(range(W.shape[0]))
    recs = label_free.discover(TrainingRows(P, labels, names), SummedLayer(W, b, positions, signs=signs), chans,
                               Clustering(top_n), chunk_rows=5)
    for c in chans:
        rec = recs[c]
        signed = (rec["sign"] * s_ref[:, c]).numpy()
        expect = np.lexsort((np.arange(len(signed)), -signed))[:top_n]
        assert rec["sign"] == (-1 if (kind != "vgg" and c in NEG) else 1)
        assert rec["top_rows"] == expect.tolist(), c
        np.testing.assert_allclose(rec["summed_activations"], s_ref[expect, c].numpy(), rtol=1e-5,
                                   atol=1e-5 * float(s_ref.abs().max()))
        assert sum(cl["size"] for cl in rec["clusters"]) == top_n
        assert sorted(r for cl in rec["clusters"] for r in cl["rows"]) == sorted(expect.tolist())
        for cl in rec["clusters"]:
            np.testing.assert_allclose(cl["mean_arv"], r_ref[cl["rows"], c].mean(dim=0).numpy(), rtol=1e-5,
                                       atol=1e-5 * float(r_ref[:, c].abs().max()))
            norm = r_ref[cl["rows"], c] / r_ref[cl["rows"], c].abs().sum(dim=1, keepdim=True)
            np.testing.assert_allclose(cl["centroid"], norm.mean(dim=0).numpy(), rtol=1e-4, atol=1e-7)
            assert sum(cl["classes"].values()) == cl["size"] == len(cl["rows"])
            counted = collections.Counter(int(y) for y in labels[cl["rows"]])  # by hand, not clustering.class_counts
            assert sorted(map(tuple, cl["class_counts"])) == sorted(counted.items())
            assert [n for _, n in cl["class_counts"]] == sorted(counted.values(), reverse=True)
            assert cl["classes"] == {names[y]: n for y, n in counted.items()}
    if kind != "vgg":  # "top" under a negative BatchNorm scale really is the most negative end
        for c in NEG:
            kth = float(np.sort(s_ref[:, c].numpy())[top_n - 1])
            assert max(recs[c]["summed_activations"]) <= kth + 1e-5 * abs(kth)


# ----------------------------------------------------------------------------- top rows

def test_candidate_rows_chunked_equals_full_sort_and_leaves_out_invalid_rows():
    rng = np.random.default_rng(3)
    P = rng.normal(size=(53, 6, 1, 2)).astype(np.float32)
    W = rng.normal(size=(4, 6, 1, 2)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    signs = torch.tensor([1, -1, 1, -1])
    valid = np.ones(53, bool)
    s = similarities.summed_activation(P, W, b, 9)
    valid[np.argmax(s[:, 0].numpy())] = False  # the strongest row of channel 0 is "unreadable"
    for chunk in (1, 4, 11, 100):
        got = label_free.candidate_rows(P, SummedLayer(W, b, 9, signs=signs), 10, valid, chunk_rows=chunk)
        for c in range(4):
            signed = (signs[c] * s[:, c]).numpy().copy()
            signed[~valid] = -np.inf
            expect = np.argsort(-signed, kind="stable")[:10]
            assert got[c].tolist() == expect.tolist(), (chunk, c)
    # more room than rows: -1 fills the rest; invalid rows never appear
    got = label_free.candidate_rows(P[:5], SummedLayer(W, b, 9, signs=signs), 8, valid[:5], chunk_rows=2)
    assert (got[:, 5:] == -1).all() and (got[:, :5] >= 0).all()


def test_top_n_most_negative_under_negative_sign_and_unreadable_rows_left_out():
    """Two identical channels, one with sign -1: its top rows are the most negative s_n; rows labelled -1
    (unreadable images) are never chosen, whatever their activation."""
    s_vals = np.array([5.0, -7.0, 3.0, -1.0, 9.0, -4.0, 0.5, -9.5, 2.0, -3.0])
    P = s_vals.astype(np.float32)[:, None, None, None]
    W = np.ones((2, 1, 1, 1), dtype=np.float32)
    labels = np.array([0, 1, 0, 1, -1, 1, 0, 1, 0, 1])  # row 4 (s = 9, the largest) is unreadable
    recs = label_free.discover(TrainingRows(P, labels, ["a", "b"]), SummedLayer(W, signs=torch.tensor([1, -1])),
                               [0, 1], Clustering(top_n=4, k=2))
    assert recs[0]["sign"] == 1 and recs[0]["top_rows"] == [0, 2, 8, 6]
    assert recs[1]["sign"] == -1 and recs[1]["top_rows"] == [7, 1, 5, 9]
    assert recs[1]["summed_activations"] == [-9.5, -7.0, -4.0, -3.0]
    with pytest.raises(ValueError):
        label_free.discover(TrainingRows(P, labels, ["a", "b"]), SummedLayer(W), [0], Clustering(top_n=10))  # 9 usable


# ----------------------------------------------------------------------------- clustering

def planted_arvs(k, per=25, d=40, noise=0.03, seed=0):
    """Rows r = scale * (u_j + noise) for k random non-negative directions u_j (each on its own random half
    of the inputs), scales spread over a factor 20 (L1 normalisation must remove them). -> (arvs, truth)."""
    rng = np.random.default_rng(seed)
    dirs = np.abs(rng.normal(size=(k, d))) * (rng.random((k, d)) < 0.5)
    dirs /= dirs.sum(axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per)
    rng.shuffle(truth)
    scale = rng.uniform(1, 20, size=len(truth))[:, None]
    return scale * (dirs[truth] + noise * np.abs(rng.normal(size=(len(truth), d))) / d), truth


@pytest.mark.parametrize("k", [2, 3])
def test_clustering_recovers_planted_concepts(tmp_path, k):
    arvs, truth = planted_arvs(k, seed=k)
    res = clustering.cluster(arvs)
    assert res["k"] == k and set(res["silhouette_by_k"]) == {2, 3, 4, 5}
    assert res["silhouette"] == max(res["silhouette_by_k"].values())
    assert adjusted_rand_score(truth, res["labels"]) >= 0.9
    assert clustering.cluster(arvs, k=k)["silhouette_by_k"].keys() == {k}

    # the same through a store: a 1x1 layer with W[c] = 1 has ARV = patch sums; weak background rows
    # (the planted rows' activations are far larger) must not reach the top-N
    rng = np.random.default_rng(k)
    background = np.abs(rng.normal(size=(60, arvs.shape[1]))) * 0.001
    allp = np.concatenate([background[:30], arvs, background[30:]]).astype(np.float32)
    P = save_memmap(tmp_path / "p.npy", allp[:, :, None, None])
    labels = np.concatenate([np.zeros(30, int), truth, np.zeros(30, int)])
    W = np.stack([np.ones(arvs.shape[1]), np.zeros(arvs.shape[1])]).astype(np.float32)[:, :, None, None]
    rec = label_free.discover(TrainingRows(P, labels, [f"class{i}" for i in range(k)]), SummedLayer(W), [0],
                              Clustering(top_n=len(truth)), chunk_rows=16)[0]
    assert sorted(rec["top_rows"]) == list(range(30, 30 + len(truth)))
    assert rec["k"] == k
    found = np.empty(len(truth), int)
    for j, cl in enumerate(rec["clusters"]):
        found[np.asarray(cl["rows"]) - 30] = j
    assert adjusted_rand_score(truth, found) >= 0.9
    assert rec["purity"] >= 0.95  # the planted concepts are the classes here


def test_purity_and_class_counts_hand_built():
    labels = np.array([0, 0, 0, 1, 1, 2])
    classes = np.array([5, 5, 7, 3, 3, 3])
    overall, per = clustering.purity(labels, classes)
    assert overall == pytest.approx(5 / 6)
    assert per == pytest.approx([2 / 3, 1.0, 1.0])
    assert clustering.purity([0, 1, 1, 0], [2, 2, 4, 4])[0] == 0.5
    assert clustering.class_counts([7, 3, 7, 3, 9]) == [[3, 2], [7, 2], [9, 1]]
    assert clustering.canonical_labels([4, 1, 1, 4, 4, 2]).tolist() == [0, 1, 1, 0, 0, 2]


def test_dead_channel_gives_one_cluster_without_silhouette():
    res = clustering.cluster(np.zeros((10, 5)))
    assert res["k"] == 1 and np.isnan(res["silhouette"]) and (res["labels"] == 0).all()


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def negbn_store(image_root, tmp_path_factory):
    """Stage 1 on the tiny ResNet with negative BatchNorm scales, then --label_free on three channels."""
    root = tmp_path_factory.mktemp("concepts")
    store = str(root / "store")
    flags = ["--data_dir", image_root, "--store_dir", store, "--model", MODEL, *RUNTIME]
    run_stage("get_importances_for_classes.py", *flags, "--batch_size", 8)
    proc = run_inproc("get_cosine_similarities.py", *flags, "--label_free", "--channels", "4,1", 2,
                      "--top_n", 10, "--chunk_rows", 7)  # in this process: the same code path, no second start-up
    assert proc.returncode == 0, proc.stderr
    return store, flags, proc


def concepts_path(store, n=10):
    return os.path.join(store, "results_get_cosine_similarities", f"{TAG}_concepts_top{n}.json")


@pytest.mark.slow
def test_label_free_command_line(image_root, negbn_store):
    store, flags, proc = negbn_store
    with open(concepts_path(store)) as f:
        doc = json.load(f)
    manifest = json.load(open(os.path.join(store, f"{TAG}_channel_importances", "manifest.json")))
    for key in ("model", "weights_sha256", "layer", "classes", "images_per_class", "files_sha256"):
        assert doc["fingerprint"][key] == manifest[key]
    assert doc["top_n"] == 10 and doc["k"] == "auto" and doc["batchnorm"] == "bn3"
    assert list(doc["channels"]) == ["1", "2", "4"]

    model = tiny_resnet_negbn()
    images, labels, names = load_split(image_root, "train")
    _, _, s_ref, r_ref = model_pass(model, model.conv3, images)
    for key, rec in doc["channels"].items():
        c = int(key)
        assert rec["channel"] == c and rec["sign"] == (-1 if c in NEG else 1)
        assert 2 <= rec["k"] <= 5 and rec["k"] == len(rec["clusters"])
        assert rec["silhouette"] == max(v for v in rec["silhouette_by_k"].values() if v is not None)
        signed = (rec["sign"] * s_ref[:, c]).numpy()
        assert rec["top_rows"] == np.lexsort((np.arange(len(signed)), -signed))[:10].tolist()
        np.testing.assert_allclose(rec["summed_activations"], s_ref[rec["top_rows"], c].numpy(), rtol=1e-4, atol=1e-5)
        hits = 0
        for cl in rec["clusters"]:
            np.testing.assert_allclose(cl["mean_arv"], r_ref[cl["rows"], c].mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
            assert [names[labels[r]] for r in cl["rows"]].count(next(iter(cl["classes"]))) == cl["class_counts"][0][1]
            hits += cl["class_counts"][0][1]
        assert rec["purity"] == pytest.approx(hits / 10)
        assert f"channel {c}: k = {rec['k']}, silhouette {rec['silhouette']:.3f}" in proc.stdout
    assert "most negative summed activation" in proc.stdout  # channels 1 and 4 have sign -1, and it is said

    # a second run on another channel keeps the first run's channels in the file
    out = run_inproc("get_cosine_similarities.py", *flags, "--label_free", "--channels", 7, "--top_n", 10)
    assert out.returncode == 0, out.stderr
    with open(concepts_path(store)) as f:
        again = json.load(f)
    assert list(again["channels"]) == ["1", "2", "4", "7"] and again["channels"]["1"] == doc["channels"]["1"]


@pytest.mark.parametrize("extra,words", [
    (["--top_n", 25], ["--top_n 25", "24 usable"]),
    (["--top_n", 2], ["--top_n 2", "at least 3"]),
    (["--k", 1], ["--k 1", "at least 2"]),
    (["--k", "many"], ["--k many"]),
    (["--k", 4, "--top_n", 4], ["--top_n 4", "at least 5"]),
    (["--channels", 16], ["--channels 16", "out of range"]),
    (["--channels", "3,x"], ["'x'"]),
])
@pytest.mark.slow
def test_label_free_bad_input_is_refused_in_one_line(negbn_store, extra, words):
    store, flags, _ = negbn_store
    before = tree_bytes(store)
    proc = run_inproc("get_cosine_similarities.py", *flags, "--label_free", *extra)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert tree_bytes(store) == before  # nothing written, the concepts file of the fixture intact
