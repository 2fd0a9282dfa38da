"""End-to-end tests of the four stage scripts through their command lines (issue 2: points 1-5 and 7).

Every number a script writes is checked against an independent computation in this file (plain
autograd with forward hooks, numpy, scipy), not against the functions of ``utils/``.

Runs go through this process by default (``conftest.run_stage`` and ``run_inproc``: ``runpy`` with
``sys.argv`` set, stdout/stderr captured, the ``SystemExit`` code taken): the same code path as
``python script.py ...`` without paying ~3 s of ``import torch`` per run. The tiny pipeline's second stage-4
run is a real subprocess (``run_script``) whose files and output must equal the in-process run's, a handful of
bad-input cases and the hard kill always run as subprocesses, and ``CLI_TESTS_SUBPROCESS=1`` runs every case
as a subprocess.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy.stats import gaussian_kde
from torchvision import transforms as T

from tests import tiny_models
from tests.conftest import ROOT, make_image_folder, run_inproc, run_script, run_stage, tree_bytes

STAGE1 = "get_importances_for_classes.py"
STAGE2 = "get_cosine_similarities.py"
STAGE3 = "disentangle_channel.py"
STAGE4 = "get_results.py"

TINY = "tests.tiny_models:tiny_resnet"
TINY_TAG = "tests_tiny_models_tiny_resnet"
TINY_VGG = "tests.tiny_models:tiny_vgg"
TINY_VGG_TAG = "tests_tiny_models_tiny_vgg"
RUNTIME = ["--num_workers", "0", "--device", "cpu"]

# The published values of rho, written here independently of utils.method.split.RHOS.
RHOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
        0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")

# stage 2 settings of the tiny run, chosen so that the cosine window drops pairs on both sides
TAU2, P2, LOW, HIGH = 0.03, 0.5, 0.85, 0.95
TAU4 = 0.03

# a download attempt fails at once, with or without internet
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
ALL_SUBPROCESS = os.environ.get("CLI_TESTS_SUBPROCESS") == "1"


# ----------------------------------------------------------------------------- running scripts
def run_sub(script, *args, cwd=None, env=None, timeout=240):
    """``run_script`` with extra environment variables and a time limit (never hangs)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def refuse(script, *args, words=(), cwd=None, env=None, sub=False):
    """Run a script that must refuse its input; check the one-line message and return it."""
    runner = run_sub if (sub or ALL_SUBPROCESS) else run_inproc
    proc = runner(script, *args, cwd=cwd, env=env)
    shown = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in proc.stderr, shown
    # torch.hub announces a download attempt on stderr before failing offline; nothing else may appear
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Downloading: ")]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: "), shown
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in the message: {lines[0]}"
    return lines[0]


# ----------------------------------------------------------------------------- independent reference
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_split(root, split):
    """Images and labels of ``root/split`` in ImageFolder order (sorted class folders, sorted files)."""
    base = os.path.join(root, split)
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    images, labels = [], []
    for y, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(base, name))):
            with Image.open(os.path.join(base, name, f)) as im:
                images.append(tf(im.convert("RGB")))
            labels.append(y)
    return torch.stack(images), np.asarray(labels), classes


def reference_pass(model, layer, images, labels, batch=8):
    """x (layer input), a (layer output), g = d logit_label / d a, logits; plain autograd on a fresh model."""
    model.eval()
    rec = {}

    def hook(module, inputs, output):
        rec["x"], rec["a"] = inputs[0].detach(), output

    handle = layer.register_forward_hook(hook)
    xs, as_, gs, zs = [], [], [], []
    try:
        for lo in range(0, len(images), batch):
            imgs, ys = images[lo:lo + batch], torch.as_tensor(labels[lo:lo + batch])
            with torch.enable_grad():
                z = model(imgs)
                (g,) = torch.autograd.grad(z[torch.arange(len(ys)), ys].sum(), rec["a"])
            xs.append(rec["x"])
            as_.append(rec["a"].detach())
            gs.append(g)
            zs.append(z.detach())
    finally:
        handle.remove()
    return SimpleNamespace(x=torch.cat(xs).double(), a=torch.cat(as_).double(), g=torch.cat(gs).double(),
                           logits=torch.cat(zs).double(), labels=np.asarray(labels))


def make_model(kind, weights=None):
    if kind == "tiny":
        return tiny_models.tiny_resnet(), "conv3"
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model, "layer4.0.conv1"


def checkpoint_file(tag, c, s1, s2, rho):
    f = "_best" if rho == "best" else str(rho)
    return f"{tag}_channel{c}_classes1{s1}_classes2{s2}_f{f}_unnormalized.pth"


def read_candidates(path):
    with open(path) as f:
        lines = f.read().splitlines()
    rows = [ln.split(",") for ln in lines[1:]]
    return lines[0], [(int(c), int(a), int(b), float(s)) for c, a, b, s in rows]


def recompute_candidates(store_folder, weight, tau, p, low, high):
    """Stage 2 from the store's arrays in numpy: histograms, used classes, ARVs, cosines, filter, sort."""
    A = np.load(os.path.join(store_folder, "attributions.npy")).astype(np.float32)
    y = np.load(os.path.join(store_folder, "targets.npy"))
    P = np.load(os.path.join(store_folder, "patch_sums.npy")).astype(np.float64)
    W = weight.detach().double().numpy()
    k = int(y.max()) + 1
    important = A >= tau * np.maximum(A, 0).sum(axis=1, keepdims=True)
    hist = np.stack([important[y == c].sum(axis=0) for c in range(k)])
    counts = np.bincount(y, minlength=k)
    used = hist >= p * counts[:, None]
    means = np.stack([P[y == c].mean(axis=0) for c in range(k)])
    out, dropped = [], 0
    for ch in range(W.shape[0]):
        ys = np.flatnonzero(used[:, ch])
        arvs = {int(c): (W[ch] * means[c]).sum(axis=(1, 2)) for c in ys}
        for i, c1 in enumerate(ys):
            for c2 in ys[i + 1:]:
                r1, r2 = arvs[int(c1)], arvs[int(c2)]
                cos = float(r1 @ r2 / (np.linalg.norm(r1) * np.linalg.norm(r2)))
                if low <= cos < high:
                    out.append((ch, int(c1), int(c2), cos))
                else:
                    dropped += 1
    out.sort(key=lambda t: -t[3])
    return out, dropped


def concept_arv(store_folder, w_c, classes):
    """ARV of channel c averaged over all training images of ``classes``, from the stored patch sums."""
    y = np.load(os.path.join(store_folder, "targets.npy"))
    P = np.load(os.path.join(store_folder, "patch_sums.npy")).astype(np.float64)
    return (P[np.isin(y, classes)].mean(axis=0) * w_c.double().numpy()).sum(axis=(1, 2))


def layer_maps(ref, conv, filters, bias=None):
    return F.conv2d(ref.x, filters.double(), None if bias is None else bias.double(),
                    conv.stride, conv.padding, conv.dilation)


# ----------------------------------------------------------------------------- checks of each stage
def check_store(folder, ref, conv, n_classes):
    """Arrays, dtypes and shapes of stage 1 against ImageFolder order and an independent autograd pass."""
    man = json.load(open(os.path.join(folder, "manifest.json")))
    assert man["complete"] is True
    assert not os.path.exists(os.path.join(folder, "progress"))
    arr = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in ARRAYS}
    n = len(ref.labels)
    c_out, c_in, kh, kw = conv.weight.shape
    assert arr["attributions"].shape == (n, c_out) and arr["attributions"].dtype == np.float16
    assert arr["patch_sums"].shape == (n, c_in, kh, kw) and arr["patch_sums"].dtype == np.float32
    for name in ("targets", "predictions"):
        assert arr[name].shape == (n,) and np.issubdtype(arr[name].dtype, np.integer)
    np.testing.assert_array_equal(arr["targets"], ref.labels)
    assert set(np.unique(ref.labels)) == set(range(n_classes))
    np.testing.assert_array_equal(arr["predictions"], ref.logits.argmax(dim=1).numpy())
    A_ref = (ref.a * ref.g).sum(dim=(2, 3)).numpy()
    scale = np.abs(A_ref).max()
    assert scale > 0
    np.testing.assert_allclose(arr["attributions"].astype(np.float64), A_ref, rtol=2e-3, atol=2e-3 * scale)
    # patch sums: sum_{k,i,j} W[c,k,i,j] P[n,k,i,j] equals the spatial sum of the layer's output (no bias)
    W = conv.weight.detach().double().reshape(c_out, -1).numpy()
    a_sum = ref.a.sum(dim=(2, 3)).numpy()
    np.testing.assert_allclose(arr["patch_sums"].astype(np.float64).reshape(n, -1) @ W.T, a_sum,
                               rtol=1e-4, atol=1e-4 * np.abs(a_sum).max())
    return man


def check_candidates(txt, store_folder, conv, tau, p, low, high, stdout=None):
    header, rows = read_candidates(txt)
    assert header == "Channel,Class1,Class2,CosineSimilarity"
    cos = [r[3] for r in rows]
    assert cos == sorted(cos, reverse=True)
    expected, dropped = recompute_candidates(store_folder, conv.weight, tau, p, low, high)
    assert [r[:3] for r in rows] == [e[:3] for e in expected]
    np.testing.assert_allclose(cos, [e[3] for e in expected], atol=1.5e-4)
    if stdout is not None:
        assert f"{len(expected)} candidates" in stdout
    return rows, expected, dropped


def check_checkpoints(store_dir, tag, c, s1, s2, conv, v1, v2, ref_train=None):
    """The 21 checkpoints: names, keys, D1 + D2 - R = W[c], the split rule per rho, the best rho."""
    folder = os.path.join(store_dir, "models_disentangled")
    names = [checkpoint_file(tag, c, s1, s2, rho) for rho in RHOS] + [checkpoint_file(tag, c, s1, s2, "best")]
    prefix = f"{tag}_channel{c}_classes1{s1}_classes2{s2}_f"
    present = sorted(f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".pth"))
    assert present == sorted(names)
    w_c = conv.weight[c].detach()
    has_bias = conv.bias is not None
    keys = {"disentangled.weight", "merged.weight"} | ({"disentangled.bias"} if has_bias else set())
    filters = []
    for rho, name in zip(RHOS, names):
        sd = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        assert set(sd) == keys
        D = sd["disentangled.weight"]
        assert D.shape == (3,) + tuple(w_c.shape)
        assert torch.equal(sd["merged.weight"], torch.tensor([1.0, 1.0, -1.0]).view(1, 3, 1, 1))
        torch.testing.assert_close(D[0] + D[1] - D[2], w_c, rtol=0, atol=1e-6)
        src1 = rho * v1 > v2
        src2 = ~src1 & (rho * v2 > v1)
        keep1 = torch.as_tensor(~src2, dtype=w_c.dtype)[:, None, None]
        keep2 = torch.as_tensor(~src1, dtype=w_c.dtype)[:, None, None]
        torch.testing.assert_close(D, torch.stack([w_c * keep1, w_c * keep2, w_c * keep1 * keep2]), rtol=0, atol=0)
        filters.append(D)
    best = torch.load(os.path.join(folder, names[-1]), map_location="cpu", weights_only=True)["disentangled.weight"]
    best_idx = [i for i, D in enumerate(filters) if torch.equal(D, best)]
    assert best_idx, "the _f_best checkpoint equals none of the 20 rho checkpoints"
    info = json.load(open(os.path.join(folder, prefix[:-2] + "_info.json")))
    assert RHOS.index(info["best_rho"]) in best_idx
    if ref_train is not None:  # the best-rho score recomputed one rho at a time
        concept = np.where(np.isin(ref_train.labels, s1), 1, np.where(np.isin(ref_train.labels, s2), 2, 0))
        scores = []
        for D in filters:
            pos = layer_maps(ref_train, conv, D).clamp_min(0).sum(dim=(2, 3)).numpy()
            q1 = pos[concept == 1, 0] / (pos[concept == 1, 1] + 1e-5)
            q2 = pos[concept == 2, 1] / (pos[concept == 2, 0] + 1e-5)
            scores.append(q1.mean() + q2.mean())
        scores = np.asarray(scores)
        np.testing.assert_allclose(info["scores"], scores, rtol=1e-3)
        assert scores[RHOS.index(info["best_rho"])] >= scores.max() * (1 - 1e-5)
    return best


def expected_rows(ref_val, conv, c, filters, s, tau):
    """(rows D1/orig, D2/orig, R/orig for the val images of classes ``s`` with rel >= tau, their orig values)."""
    sel = np.isin(ref_val.labels, s)
    pos = (ref_val.a * ref_val.g).clamp_min(0).sum(dim=(2, 3))
    rel = (pos[:, c] / pos.sum(dim=1)).numpy()
    orig = ref_val.a[:, c].sum(dim=(1, 2)).numpy()
    maps = layer_maps(ref_val, conv, filters).sum(dim=(2, 3)).numpy()
    keep = sel & (rel >= tau)
    return maps[keep] / orig[keep][:, None], orig[sel], maps[sel]


def read_rows(path):
    with open(path) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return np.asarray([[float(v) for v in ln.split(",")] for ln in lines]).reshape(-1, 3)


def read_blocks(path):
    """{name: (x, y) arrays} of the filecontents* blocks of a density file."""
    blocks, name, pts = {}, None, []
    with open(path) as f:
        for ln in f.read().splitlines():
            if ln.startswith("\\begin{filecontents*}{"):
                name, pts = ln[len("\\begin{filecontents*}{"):-1], []
            elif ln == "\\end{filecontents*}":
                blocks[name] = np.asarray(pts)
                name = None
            elif name is not None:
                pts.append([float(v) for v in ln.split()])
    return blocks


def check_stage4(out_dir, ref_val, conv, c, s1, s2, filters, tau, stdout=None, name=None):
    """``name``: the file tag of a layer other than the model's last conv (its files carry it), else None."""
    latest, pre = ("", "") if name is None else (f"_{name}", f"{name}_")
    for f in (f"plots/density_concept1{latest}.png", f"plots/density_concept2{latest}.png"):
        with open(os.path.join(out_dir, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f
    n_rows = 0
    for k, s in ((1, s1), (2, s2)):
        rows, orig, maps = expected_rows(ref_val, conv, c, filters, s, tau)
        got = read_rows(os.path.join(out_dir, "results_quantitative", f"quantitative_{pre}concept{k}_required{tau}.txt"))
        assert got.shape == rows.shape
        np.testing.assert_allclose(got, rows, rtol=1e-3, atol=1e-4)
        n_rows += len(rows)
        if stdout is not None:
            assert f"concept {k}: {len(rows)} of {len(orig)} val images" in stdout
        blocks = read_blocks(os.path.join(out_dir, "results_disentanglement", f"density_concept{k}{latest}.txt"))
        assert list(blocks) == [f"original_c{k}.dat", f"disentangled1_c{k}.dat", f"disentangled2_c{k}.dat"]
        for (name, pts), vals in zip(blocks.items(), (orig, maps[:, 0], maps[:, 1])):
            assert pts.shape == (200, 2), name
            kde = gaussian_kde(vals, bw_method="scott")
            bw = np.sqrt(kde.covariance[0, 0])
            xs = np.linspace(vals.min() - 3 * bw, vals.max() + 3 * bw, 200)
            np.testing.assert_allclose(pts[:, 0], xs, rtol=1e-4, atol=1e-4 * np.abs(xs).max())
            np.testing.assert_allclose(pts[:, 1], kde(xs), rtol=1e-3, atol=1e-3 * kde(xs).max())
    assert n_rows > 0, "no val image passed the relative-attribution threshold: the row check was vacuous"


# ----------------------------------------------------------------------------- the tiny pipeline
@pytest.fixture(scope="module")
def tiny(image_root, tmp_path_factory):
    """The four scripts on the tiny ResNet with the published flags; stage 2 and 4 write into the cwd."""
    root = str(tmp_path_factory.mktemp("tiny"))
    store, cwd = os.path.join(root, "store"), os.path.join(root, "cwd")
    os.makedirs(cwd)
    model_flags = ["--model", TINY, "--batch_size", "4", "--gpu", "0"] + RUNTIME
    s1 = run_stage(STAGE1, "--data_dir", image_root, "--store_dir", store, *model_flags)
    s2 = run_stage(STAGE2, "--data_dir", image_root, "--store_dir", store, *model_flags,
                   "--nr_channels_in_layer_of_interest", 16, "--proportion_attribution_required", TAU2,
                   "--p", P2, "--cos_sim_low", LOW, "--cos_sim_high", HIGH, cwd=cwd)
    txt = os.path.join(cwd, "results_get_cosine_similarities", f"{TINY_TAG}_required{TAU2}_p{P2}_cossim{LOW}to{HIGH}.txt")
    _, rows = read_candidates(txt)
    assert rows, "stage 2 found no candidate on the tiny model: the test data no longer exercise stage 3"
    c, y1, y2, _ = rows[0]
    s3 = run_stage(STAGE3, "--data_dir", image_root, "--store_dir", store, *model_flags,
                   "--nr_channels_in_layer_of_interest", 16, "--channel_disentangle", c,
                   "--classes_for_concept1", y1, "--classes_for_concept2", y2)
    s4_args = [STAGE4, "--data_dir", image_root, "--model_dir", store, *model_flags,
               "--nr_channels_in_layer_of_interest", 16, "--layer_of_interest", "conv3",
               "--channel_of_interest", c, "--classes_for_concept1", y1, "--classes_for_concept2", y2,
               "--get_qualitative", "--get_quantitative", "--proportion_attribution_required", TAU4]
    s4 = run_stage(*s4_args, cwd=cwd)
    after_first = tree_bytes(cwd)
    s4b = run_script(*s4_args, cwd=cwd)  # a real process: the same files and output as the in-process run
    after_second = tree_bytes(cwd)
    model, layer = make_model("tiny")
    conv = model.get_submodule(layer)
    train_x, train_y, _ = load_split(image_root, "train")
    val_x, val_y, _ = load_split(image_root, "val")
    return SimpleNamespace(root=root, store=store, cwd=cwd, folder=os.path.join(store, f"{TINY_TAG}_channel_importances"),
                           data=image_root, c=c, y1=y1, y2=y2, txt=txt, s1=s1, s2=s2, s3=s3, s4=s4, s4b=s4b,
                           after_first=after_first, after_second=after_second, conv=conv,
                           ref_train=reference_pass(model, conv, train_x, train_y),
                           ref_val=reference_pass(model, conv, val_x, val_y))


@pytest.mark.slow
def test_tiny_stage1_store_matches_independent_pass(tiny):
    man = check_store(tiny.folder, tiny.ref_train, tiny.conv, 4)
    assert man["layer"] == "conv3"  # last_conv of the tiny ResNet
    assert man["classes"] == ["class0", "class1", "class2", "class3"] and man["images_per_class"] == [6] * 4
    assert "24 images" in tiny.s1.stdout


@pytest.mark.slow
def test_tiny_stage2_table_matches_numpy_recomputation(tiny):
    assert os.path.isfile(tiny.txt)  # --out_dir defaults to the working directory
    rows, expected, dropped = check_candidates(tiny.txt, tiny.folder, tiny.conv, TAU2, P2, LOW, HIGH, tiny.s2.stdout)
    assert len(rows) >= 2 and dropped >= 1  # the window [LOW, HIGH) really filtered something
    # the printed table: the strongest candidates, lowest cosine first, with the images that find them important
    out = tiny.s2.stdout.splitlines()
    start = next(i for i, x in enumerate(out) if x.split()[:1] == ["channel"]) + 1
    row = re.compile(r"\s*(\d+)\s+class(\d) \((\d)\)\s+class(\d) \((\d)\)\s+(-?[\d.]+)\s+(\d+) of (\d+) / (\d+) of (\d+)$")
    shown = []
    while start < len(out) and row.match(out[start]):
        shown.append(row.match(out[start]).groups())
        start += 1
    assert out[start].startswith(f"{len(rows)} candidates")
    assert [(int(g[0]), int(g[2]), int(g[4])) for g in shown] == \
        [r[:3] for r in sorted(rows, key=lambda r: (round(r[3], 4), r[0], r[1], r[2]))][:20]
    assert all(g[1] == g[2] and g[3] == g[4] for g in shown)  # name and index of the same folder
    res = os.path.join(tiny.store, "results_get_cosine_similarities")
    cj = json.load(open(os.path.join(res, f"{TINY_TAG}_required{TAU2}_p{P2}_cossim{LOW}to{HIGH}_candidates.json")))
    assert [(d["channel"], d["class1"], d["class2"]) for d in cj["candidates"]] == [r[:3] for r in rows]
    hist = json.load(open(os.path.join(res, f"{TINY_TAG}_required{TAU2}_histograms.json")))
    A = np.load(os.path.join(tiny.folder, "attributions.npy")).astype(np.float32)
    y = np.load(os.path.join(tiny.folder, "targets.npy"))
    imp = A >= TAU2 * np.maximum(A, 0).sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(hist["histogram_class_by_channel"], [imp[y == k].sum(0) for k in range(4)])
    for g in shown:  # how many images of each class find the channel important, of the class's images
        c, y1, y2 = int(g[0]), int(g[2]), int(g[4])
        assert [int(v) for v in g[6:]] == [imp[y == y1, c].sum(), (y == y1).sum(), imp[y == y2, c].sum(),
                                           (y == y2).sum()]


@pytest.mark.slow
def test_tiny_stage3_checkpoints(tiny):
    w_c = tiny.conv.weight[tiny.c].detach()
    v1 = concept_arv(tiny.folder, w_c, [tiny.y1])
    v2 = concept_arv(tiny.folder, w_c, [tiny.y2])
    check_checkpoints(tiny.store, TINY_TAG, tiny.c, [tiny.y1], [tiny.y2], tiny.conv, v1, v2, tiny.ref_train)
    assert "OK, same function" in tiny.s3.stdout


@pytest.mark.slow
def test_tiny_stage4_outputs_in_working_directory(tiny):
    best = torch.load(os.path.join(tiny.store, "models_disentangled",
                                   checkpoint_file(TINY_TAG, tiny.c, [tiny.y1], [tiny.y2], "best")), weights_only=True)
    check_stage4(tiny.cwd, tiny.ref_val, tiny.conv, tiny.c, [tiny.y1], [tiny.y2], best["disentangled.weight"],
                 TAU4, tiny.s4.stdout)
    assert os.path.isfile(os.path.join(tiny.cwd, "results_quantitative", f"quantitative_concept1_required{TAU4}.txt"))


@pytest.mark.slow
def test_tiny_stage4_twice_gives_same_files(tiny):
    quant = {k: v for k, v in tiny.after_second.items() if k.startswith("results_quantitative")}
    assert len(quant) >= 3 and quant == {k: v for k, v in tiny.after_first.items()
                                         if k.startswith("results_quantitative")}
    best = torch.load(os.path.join(tiny.store, "models_disentangled",
                                   checkpoint_file(TINY_TAG, tiny.c, [tiny.y1], [tiny.y2], "best")), weights_only=True)
    for k, s in ((1, [tiny.y1]), (2, [tiny.y2])):  # one row per included image after two runs, not two
        rows = read_rows(os.path.join(tiny.cwd, "results_quantitative", f"quantitative_concept{k}_required{TAU4}.txt"))
        expected = expected_rows(tiny.ref_val, tiny.conv, tiny.c, best["disentangled.weight"], s, TAU4)[0]
        assert len(rows) == len(expected)
    assert tiny.s4b.stdout == tiny.s4.stdout


@pytest.mark.slow
def test_tiny_several_classes_per_concept(tiny, tmp_path):
    c, s1, s2 = 1, [0, 2], [1]
    flags = ["--model", TINY, "--batch_size", "3", *RUNTIME, "--channel_disentangle", c,
             "--classes_for_concept1", *s1, "--classes_for_concept2", *s2]
    s3 = run_stage(STAGE3, "--data_dir", tiny.data, "--store_dir", tiny.store, *flags)
    assert "OK, same function" in s3.stdout
    assert "12 train images" in s3.stdout and "6 train images" in s3.stdout
    w_c = tiny.conv.weight[c].detach()
    v1, v2 = concept_arv(tiny.folder, w_c, s1), concept_arv(tiny.folder, w_c, s2)
    best = check_checkpoints(tiny.store, TINY_TAG, c, s1, s2, tiny.conv, v1, v2, tiny.ref_train)
    out = str(tmp_path / "out")
    s4 = run_stage(STAGE4, "--data_dir", tiny.data, "--model_dir", tiny.store, "--model", TINY,
                   "--batch_size", "3", *RUNTIME, "--layer_of_interest", "conv3", "--channel_of_interest", c,
                   "--classes_for_concept1", *s1, "--classes_for_concept2", *s2, "--get_qualitative",
                   "--get_quantitative", "--out_dir", out, cwd=str(tmp_path))
    check_stage4(out, tiny.ref_val, tiny.conv, c, s1, s2, best, TAU4, s4.stdout)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # --out_dir is honoured: nothing in the working directory


# ----------------------------------------------------------------------------- torchvision resnet18 with a state-dict file
@pytest.mark.slow
def test_resnet18_with_state_dict_file(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=3, val_per_class=2, seed=5)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    wfile = str(tmp_path / "resnet18_4classes.pth")
    torch.save(net.state_dict(), wfile)
    store, out, cwd = str(tmp_path / "store"), str(tmp_path / "out"), str(tmp_path / "cwd")
    os.makedirs(cwd)
    layer = "layer4.0.conv1"  # 3x3, stride 2, padding 1, no bias
    same = ["--model", "resnet18", "--weights", wfile, "--layer_of_interest", layer,
            "--batch_size", "8", *RUNTIME]  # one set of flags for all four scripts
    run_stage(STAGE1, "--data_dir", data, "--store_dir", store, *same, cwd=cwd)
    s2 = run_stage(STAGE2, "--data_dir", data, "--store_dir", store, *same,
                   "--nr_channels_in_layer_of_interest", 512, "--out_dir", out, cwd=cwd)
    model, _ = make_model("resnet18", wfile)
    conv = model.get_submodule(layer)
    train_x, train_y, _ = load_split(data, "train")
    val_x, val_y, _ = load_split(data, "val")
    ref_train = reference_pass(model, conv, train_x, train_y)
    name = "resnet18_layer4.0.conv1"  # not the last conv: the layer is in every file name
    folder = os.path.join(store, f"{name}_channel_importances")
    man = check_store(folder, ref_train, conv, 4)
    assert man["layer"] == layer and man["weights"] == os.path.abspath(wfile)
    # the defaults of stage 2: tau 0.05, p 0.75, cosine in [0, 1)
    txt = os.path.join(out, "results_get_cosine_similarities", f"{name}_required0.05_p0.75_cossim0.0to1.0.txt")
    check_candidates(txt, folder, conv, 0.05, 0.75, 0.0, 1.0, s2.stdout)
    # disentangle the channel with the largest attribution share in both classes (512 channels: shares are small)
    y1, y2, tau = 0, 3, 0.002
    A = np.load(os.path.join(folder, "attributions.npy")).astype(np.float64)
    share = A / np.maximum(A, 0).sum(axis=1, keepdims=True)
    c = int(np.argmax(np.minimum(share[train_y == y1].mean(0), share[train_y == y2].mean(0))))
    s3 = run_stage(STAGE3, "--data_dir", data, "--store_dir", store, *same,
                   "--nr_channels_in_layer_of_interest", 512, "--channel_disentangle", c,
                   "--classes_for_concept1", y1, "--classes_for_concept2", y2, cwd=cwd)
    assert "OK, same function" in s3.stdout
    w_c = conv.weight[c].detach()
    best = check_checkpoints(store, name, c, [y1], [y2], conv, concept_arv(folder, w_c, [y1]),
                             concept_arv(folder, w_c, [y2]), ref_train)
    s4 = run_stage(STAGE4, "--data_dir", data, "--model_dir", store, *same,
                   "--nr_channels_in_layer_of_interest", 512, "--channel_of_interest", c,
                   "--classes_for_concept1", y1, "--classes_for_concept2", y2, "--get_qualitative",
                   "--get_quantitative", "--proportion_attribution_required", tau, "--out_dir", out, cwd=cwd)
    check_stage4(out, reference_pass(model, conv, val_x, val_y), conv, c, [y1], [y2], best, tau, s4.stdout, name)
    assert os.listdir(cwd) == []  # everything went to --out_dir and --store_dir


# ----------------------------------------------------------------------------- resume after a hard kill
@pytest.mark.slow
def test_stage1_resumes_after_sigkill_with_identical_arrays(tmp_path):
    def args(data, store):
        return ["--data_dir", data, "--store_dir", store, "--model", TINY, "--batch_size", "1",
                "--chunk_size", "2", *RUNTIME]

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for attempt, per_class in enumerate((8, 24, 60)):
        data = make_image_folder(str(tmp_path / f"data{attempt}"), train_per_class=per_class, val_per_class=1)
        store = str(tmp_path / f"store{attempt}")
        folder = os.path.join(store, f"{TINY_TAG}_channel_importances")
        progress = os.path.join(folder, "progress")
        with open(tmp_path / f"stderr{attempt}", "w") as errf:
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, STAGE1), *args(data, store)], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=errf)
            deadline, killed = time.time() + 120, False
            try:
                while time.time() < deadline and proc.poll() is None:
                    if os.path.isdir(progress) and any(f.startswith("chunk_") for f in os.listdir(progress)):
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        break
                    time.sleep(0.01)
            finally:
                if proc.poll() is None and not killed:
                    proc.kill()
                proc.wait()
        if not killed:  # it finished before the first chunk marker was seen: retry with more images
            assert proc.returncode == 0, open(tmp_path / f"stderr{attempt}").read()
            continue
        manifest = json.load(open(os.path.join(folder, "manifest.json")))
        if not manifest["complete"]:
            break
        # the kill arrived after the store was finished: retry with more images
    else:
        pytest.fail("stage 1 finished before it could be killed, three times with more and more images")
    assert manifest["complete"] is False

    n = 4 * per_class
    num_chunks = n // 2
    done = len([f for f in os.listdir(progress) if f.startswith("chunk_")])
    assert os.path.exists(os.path.join(folder, ".lock"))  # the killed run's lock: the next run takes it over
    assert 1 <= done < num_chunks and manifest["num_chunks"] == num_chunks

    # an incomplete store is refused by the later stages, and they change nothing
    before = tree_bytes(store)
    refuse(STAGE2, "--data_dir", data, "--store_dir", store, "--model", TINY, *RUNTIME,
           words=("incomplete", "rerun", f"{done} of {num_chunks}"))
    refuse(STAGE3, "--data_dir", data, "--store_dir", store, "--model", TINY, *RUNTIME,
           "--channel_disentangle", 0, "--classes_for_concept1", 0, "--classes_for_concept2", 1,
           words=("incomplete",))
    assert tree_bytes(store) == before

    resumed = run_stage(STAGE1, *args(data, store))  # the killed run was a process; the rest is computation
    assert "resuming" in resumed.stdout and f"{done} chunks already done" in resumed.stdout
    assert f"done: {n - 2 * done} images" in resumed.stdout
    ref_store = str(tmp_path / "reference")  # an uninterrupted run, in the same kind of process
    run_stage(STAGE1, *args(data, ref_store))
    ref_folder = os.path.join(ref_store, f"{TINY_TAG}_channel_importances")
    for name in ARRAYS:
        with open(os.path.join(folder, name + ".npy"), "rb") as a, open(os.path.join(ref_folder, name + ".npy"), "rb") as b:
            assert a.read() == b.read(), name
    assert json.load(open(os.path.join(folder, "manifest.json")))["complete"] is True
    assert not os.path.exists(progress)

    # a complete store is not recomputed: nothing rewritten
    stamps = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    before = tree_bytes(store)
    time.sleep(0.01)
    again = run_inproc(STAGE1, *args(data, store))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert tree_bytes(store) == before
    assert {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)} == stamps


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(tiny, tmp_path_factory):
    """Material for the bad inputs: other weights, other datasets, a store copied under another model's name."""
    root = str(tmp_path_factory.mktemp("bad"))
    other = tiny_models.tiny_resnet()
    with torch.no_grad():
        other.conv3.weight.mul_(1.5)
    wfile = os.path.join(root, "other_weights.pth")
    torch.save(other.state_dict(), wfile)
    vgg_store = os.path.join(root, "vgg_store")
    shutil.copytree(tiny.folder, os.path.join(vgg_store, f"{TINY_VGG_TAG}_channel_importances"))
    empty = os.path.join(root, "empty")
    for split in ("train", "val"):
        os.makedirs(os.path.join(empty, split))
    no_images = os.path.join(root, "no_images")
    for split in ("train", "val"):
        for k in range(4):
            os.makedirs(os.path.join(no_images, split, f"class{k}"))
    return SimpleNamespace(
        wfile=wfile, vgg_store=vgg_store, empty=empty, no_images=no_images, missing=os.path.join(root, "missing"),
        fresh=os.path.join(root, "fresh_store"),  # must never be created by a refused run
        data_count=make_image_folder(os.path.join(root, "data_count"), train_per_class=5, val_per_class=2),
        data_classes=make_image_folder(os.path.join(root, "data_classes"), train_per_class=8, num_classes=3, seed=3),
        data_renamed=_renamed_copy(tiny.data, os.path.join(root, "data_renamed")),
        data_moved=shutil.copytree(tiny.data, os.path.join(root, "data_moved")))


def _renamed_copy(src, dst):
    """The same classes and image counts as ``src``, one training image under another file name."""
    shutil.copytree(src, dst)
    folder = os.path.join(dst, "train", "class0")
    first = sorted(os.listdir(folder))[0]
    os.rename(os.path.join(folder, first), os.path.join(folder, "renamed_" + first))
    return dst


def _mismatch_args(tiny, bad, variant):
    """(store_dir, extra flags, data_dir, key word) for a store made with other settings."""
    return {
        "model": (bad.vgg_store, ["--model", TINY_VGG], tiny.data, "model"),
        "weights": (tiny.store, ["--model", TINY, "--weights", bad.wfile], tiny.data, "weights"),
        "layer": (tiny.store, ["--model", TINY, "--layer_of_interest", "conv2"], tiny.data, "layer"),
        "image_count": (tiny.store, ["--model", TINY], bad.data_count, "dataset"),
        "class_folders": (tiny.store, ["--model", TINY], bad.data_classes, "dataset"),
        "file_names": (tiny.store, ["--model", TINY], bad.data_renamed, "other image file names"),
    }[variant]


def _snapshot(tiny, bad):
    return {"tiny": tree_bytes(tiny.root), "vgg": tree_bytes(bad.vgg_store)}


STAGE_OF = {1: STAGE1, 2: STAGE2, 3: STAGE3}


# stage 1 with another layer is not refused: that layer's store gets a folder of its own (test_own_model.py)
@pytest.mark.parametrize("stage,variant", [(s, v) for s in (1, 2, 3) for v in ("model", "weights", "layer", "image_count",
                                                                             "class_folders", "file_names")
                                           if (s, v) != (1, "layer")])
@pytest.mark.slow
def test_store_made_with_other_settings_is_refused(tiny, bad, stage, variant):
    store, flags, data, word = _mismatch_args(tiny, bad, variant)
    extra = ["--channel_disentangle", 0, "--classes_for_concept1", 0, "--classes_for_concept2", 1] if stage == 3 else []
    before = _snapshot(tiny, bad)
    sub = (stage, variant) == (2, "weights")
    msg = refuse(STAGE_OF[stage], "--data_dir", data, "--store_dir", store, *flags, "--batch_size", 4, *RUNTIME,
                 *extra, words=(word, "store"), cwd=tiny.cwd, sub=sub)
    if variant == "image_count":
        assert "24" in msg and "20" in msg  # the image counts it compared
    assert _snapshot(tiny, bad) == before


@pytest.mark.slow
def test_moved_dataset_is_accepted(tiny, bad):
    """The store fingerprints image paths relative to the root: the same files elsewhere still match."""
    proc = run_inproc(STAGE2, "--data_dir", bad.data_moved, "--store_dir", tiny.store, "--model", TINY,
                      "--batch_size", 4, *RUNTIME, "--proportion_attribution_required", TAU2, "--p", P2,
                      "--cos_sim_low", LOW, "--cos_sim_high", HIGH, "--out_dir", os.path.join(bad.data_moved, "o"))
    assert proc.returncode == 0, proc.stderr
    txt = os.path.join(bad.data_moved, "o", "results_get_cosine_similarities", os.path.basename(tiny.txt))
    with open(txt) as a, open(tiny.txt) as b:
        assert a.read() == b.read()


@pytest.mark.slow
def test_checkpoint_of_other_weights_is_refused(tiny, bad):
    before = _snapshot(tiny, bad)
    refuse(STAGE4, "--data_dir", tiny.data, "--model_dir", tiny.store, "--model", TINY, "--weights", bad.wfile,
           *RUNTIME, "--layer_of_interest", "conv3", "--channel_of_interest", tiny.c, "--classes_for_concept1",
           tiny.y1, "--classes_for_concept2", tiny.y2, "--get_quantitative", "--get_qualitative",
           words=("weights",), cwd=tiny.cwd)
    assert _snapshot(tiny, bad) == before


def _stage_args(tiny, stage, c=None, s1=None, s2=None, data=None, store=None):
    c = tiny.c if c is None else c
    s1 = [tiny.y1] if s1 is None else s1
    s2 = [tiny.y2] if s2 is None else s2
    data = tiny.data if data is None else data
    base = ["--data_dir", data, "--model", TINY, "--batch_size", 4, *RUNTIME]
    if stage == 1:
        return [STAGE1, *base, "--store_dir", store or tiny.store]
    if stage == 2:
        return [STAGE2, *base, "--store_dir", store or tiny.store]
    concepts = ["--classes_for_concept1", *s1, "--classes_for_concept2", *s2]
    if stage == 3:
        return [STAGE3, *base, "--store_dir", store or tiny.store, "--channel_disentangle", c, *concepts]
    return [STAGE4, *base, "--model_dir", store or tiny.store, "--layer_of_interest", "conv3",
            "--channel_of_interest", c, *concepts, "--get_qualitative", "--get_quantitative"]


BAD_CASES = {
    # name: (stage, keyword arguments of _stage_args, extra flags, key words of the message, as subprocess)
    "channel_too_large_stage3": (3, dict(c=16), [], ("out of range", "16 channels"), False),
    "channel_negative_stage3": (3, dict(c=-1), [], ("out of range",), False),
    "channel_too_large_stage4": (4, dict(c=16), [], ("out of range", "16 channels"), False),
    "class_too_large_stage3": (3, dict(s2=[4]), [], ("class 4", "out of range"), False),
    "class_too_large_stage4": (4, dict(s1=[0, 7]), [], ("class 7", "out of range"), False),
    "same_class_both_stage3": (3, dict(s1=[0, 1], s2=[1]), [], ("both concepts",), False),
    "same_class_both_stage4": (4, dict(s1=[2], s2=[2, 3]), [], ("both concepts",), False),
    "missing_store_stage2": (2, dict(store="MISSING"), [], ("no store", "get_importances_for_classes.py"), True),
    "missing_store_stage3": (3, dict(store="MISSING"), [], ("no store",), False),
    "missing_checkpoint_stage4": (4, dict(c="OTHER"), [], ("not found", "disentangle_channel.py"), False),
    "missing_rho_checkpoint_stage4": (4, {}, ["--f", "0.33"], ("f0.33", "not found"), False),
    "missing_data_stage1": (1, dict(data="MISSING", store="FRESH"), [], ("--data_dir", "not found"), False),
    "missing_data_stage2": (2, dict(data="MISSING"), [], ("--data_dir", "not found"), False),
    "missing_data_stage4": (4, dict(data="MISSING"), [], ("--data_dir", "not found"), False),
    "empty_data_stage1": (1, dict(data="EMPTY", store="FRESH"), [], ("--data_dir", "no images"), False),
    "empty_data_stage3": (3, dict(data="EMPTY"), [], ("--data_dir", "no images"), False),
    "no_image_files_stage1": (1, dict(data="NO_IMAGES", store="FRESH"), [], ("--data_dir", "no images"), False),
    "no_image_files_stage4": (4, dict(data="NO_IMAGES"), [], ("--data_dir", "no images"), False),
    "nr_channels_stage1": (1, {}, ["--nr_channels_in_layer_of_interest", 2048], ("2048", "16 output channels"), False),
    "nr_channels_stage2": (2, {}, ["--nr_channels_in_layer_of_interest", 2048], ("2048", "16 output channels"), False),
    "nr_channels_stage3": (3, {}, ["--nr_channels_in_layer_of_interest", 15], ("15", "16 output channels"), False),
    "nr_channels_stage4": (4, {}, ["--nr_channels_in_layer_of_interest", 17], ("17", "16 output channels"), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_refused_in_one_line(tiny, bad, case):
    stage, kw, extra, words, sub = BAD_CASES[case]
    subst = {"MISSING": bad.missing, "FRESH": bad.fresh, "EMPTY": bad.empty, "NO_IMAGES": bad.no_images}
    kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    if kw.get("c") == "OTHER":  # a channel in range that was never disentangled
        kw["c"] = (tiny.c + 1) % 16
    before = _snapshot(tiny, bad)
    refuse(*_stage_args(tiny, stage, **kw), *extra, words=words, cwd=tiny.cwd, sub=sub)
    assert _snapshot(tiny, bad) == before
    for path in (bad.missing, bad.fresh):
        assert not os.path.exists(path)


LAYER_CASES = {
    "nonexistent": ("layer9.conv", ("no such module", "layer9.conv")),
    "not_a_conv": ("bn3", ("bn3", "BatchNorm2d", "not a Conv2d")),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(LAYER_CASES))
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_bad_layer_is_refused_by_every_script(tiny, bad, stage, what):
    layer, words = LAYER_CASES[what]
    args = _stage_args(tiny, stage, store=bad.fresh if stage == 1 else None)
    if "--layer_of_interest" in args:
        i = args.index("--layer_of_interest")
        args = args[:i] + args[i + 2:]
    before = _snapshot(tiny, bad)
    refuse(*args, "--layer_of_interest", layer, words=words, cwd=tiny.cwd)
    assert _snapshot(tiny, bad) == before
    assert not os.path.exists(bad.fresh)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 4])
def test_grouped_conv_is_refused(tiny, bad, stage):
    args = _stage_args(tiny, stage, c=0, s1=[0], s2=[1], store=bad.fresh)
    args[args.index(TINY)] = "tests.tiny_models:grouped_net"
    if "--layer_of_interest" in args:
        args[args.index("--layer_of_interest") + 1] = "conv"
    else:
        args += ["--layer_of_interest", "conv"]
    before = _snapshot(tiny, bad)
    refuse(*args, words=("grouped", "groups=3"), cwd=tiny.cwd)
    assert _snapshot(tiny, bad) == before
    assert not os.path.exists(bad.fresh)


@pytest.mark.slow
@pytest.mark.parametrize("stage,weights", [(1, ["--weights", "IMAGENET1K_V1"]), (3, [])])
def test_torchvision_weights_offline_say_what_to_pass(tiny, bad, tmp_path, stage, weights):
    """resnet18 weights that are not in the (empty) torch hub cache and cannot be downloaded here."""
    torch_home = str(tmp_path / "torch_home")
    os.makedirs(torch_home)
    args = _stage_args(tiny, stage, c=0, s1=[0], s2=[1], store=bad.fresh)
    args[args.index(TINY)] = "resnet18"
    before = _snapshot(tiny, bad)
    t0 = time.time()
    msg = refuse(*args, *weights, words=("--weights", "resnet18-f37072fd.pth"), cwd=tiny.cwd,
                 env=OFFLINE | {"TORCH_HOME": torch_home}, sub=(stage == 1))
    assert time.time() - t0 < 120
    assert torch_home in msg  # where to put the file for an offline run
    assert _snapshot(tiny, bad) == before
    assert not os.path.exists(bad.fresh)


@pytest.mark.slow
def test_a_reader_that_stops_early_is_not_an_error():
    """``--list_layers | head -1``: the reader closes the pipe; the script ends with status 1 and says nothing
    (as other command-line tools), instead of 'error: Broken pipe'."""
    code = ("import sys; from utils.run import cli\n"
            "def main():\n"
            "    print('line'); sys.stdout.flush(); raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (1, "", "line\n")


def test_stage1_in_process_leaves_the_thread_count_as_it_was(image_root, tmp_path):
    """--cpu_threads sets the threads for the run only: a notebook (or a test) that calls main(args) keeps its own
    count, on which every later CPU computation's rounding depends."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        proc = run_inproc("get_importances_for_classes.py", "--data_dir", image_root, "--store_dir", tmp_path,
                          "--model", TINY, "--batch_size", 4, "--num_workers", 0, "--device", "cpu",
                          "--cpu_threads", 1)
        assert proc.returncode == 0, proc.stderr
        assert torch.get_num_threads() == 2
        manifest = json.load(open(tmp_path / f"{TINY_TAG}_channel_importances" / "manifest.json"))
        assert manifest["numerics"]["cpu_threads"] == 1  # the run itself used one thread
    finally:
        torch.set_num_threads(before)
