"""Stage-4 math: the per-image numbers against the full original and disentangled networks run
explicitly, the quantitative filter, the density curves, the quantitative files, top-k."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from tests.tiny_models import tiny_resnet, tiny_vgg
from utils import disentangle
from utils.data import folders
from utils.data.scan import ScanPlan
from utils.files import atomic, names, registry
from utils.method import attribution, evaluation, split
from utils.model import tap
from utils.report.latex import filecontents_block
from utils.stages import stage4, stage4_passes


def evaluate(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers, desc="stage 4"):
    """``stage4.evaluate_many`` of one run over the images ``indices`` (its classes: theirs)."""
    classes = {ds.targets[i] for i in indices}
    plan = ScanPlan(ds, batch_size, device, num_workers)
    return stage4.evaluate_many(model, conv, [(channel, filters, bias, classes)], plan, indices, desc)[0]


def scan_activations(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers):
    """``stage4.scan_many`` of one run: (scanned indices, orig_pos (M,), maps_pos (M, k+1))."""
    scanned, ((orig_pos, maps_pos),) = stage4.scan_many(model, conv, [(channel, filters, bias)],
                                                        ScanPlan(ds, batch_size, device, num_workers), indices)
    return scanned, orig_pos, maps_pos


def batch_numbers(model, conv, channel, filters, bias, images, labels):
    """The stage-4 numbers of one batch (images (B, 3, H, W), labels (B,)) as CPU tensors."""
    x, a, g, _ = tap.logits_and_layer_grad(model, conv, images, labels)
    out = stage4_passes.channel_numbers(x.float(), a, attribution.positive_attribution(a, g), conv, channel,
                                        filters, bias)
    return {k: v.cpu() for k, v in out.items()}


def _frozen(model):
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def _reference_numbers(model, path, channel, sd, images, labels):
    """rel, orig, maps, orig_pos, maps_pos from the full networks with ordinary autograd.

    Original: a hook keeps L's output (retain_grad), the image requires grad so the whole graph exists,
    backward of sum_n z_{y_n}. Disentangled: the full network from the checkpoint, a hook on L' reads
    D1 (row c), D2 (row C_out), R (row C_out + 1).
    """
    conv = model.get_submodule(path)
    c_out = conv.out_channels
    keep = {}

    def hook(m, i, o):
        o.retain_grad()
        keep["a"] = o

    h = conv.register_forward_hook(hook)
    img = images.clone().requires_grad_(True)
    z = model(img)
    h.remove()
    z.gather(1, labels[:, None]).sum().backward()
    a, g = keep["a"].detach().double(), keep["a"].grad.double()
    ag = a * g
    rel = []
    for n in range(len(images)):
        per_channel = [float(ag[n, k].clamp_min(0).sum()) for k in range(c_out)]
        rel.append(per_channel[channel] / sum(per_channel))

    dm = disentangle.disentangled_model(model, path, channel, sd)
    out = {}
    h = dm.get_submodule(path)[0].register_forward_hook(lambda m, i, o: out.__setitem__("o", o))
    with torch.no_grad():
        z2 = dm(images)
    h.remove()
    o = out["o"].double()
    maps = torch.stack([o[:, channel], o[:, c_out], o[:, c_out + 1]], dim=1)  # (N, 3, H, W)
    return {"rel": np.array(rel),
            "orig": a[:, channel].sum(dim=(1, 2)).numpy(),
            "maps": maps.sum(dim=(2, 3)).numpy(),
            "orig_pos": a[:, channel].clamp_min(0).sum(dim=(1, 2)).numpy(),
            "maps_pos": maps.clamp_min(0).sum(dim=(2, 3)).numpy(),
            "logits": z.detach(), "logits_disentangled": z2}


CASES = {
    "tiny_resnet_conv3": (tiny_resnet, "conv3", 4),
    "tiny_resnet_conv2": (tiny_resnet, "conv2", 9),
    "tiny_vgg_features.6_bias": (tiny_vgg, "features.6", 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluate_equals_full_networks(case, image_root, tmp_path):
    make, path, channel = CASES[case]
    model = _frozen(make())
    conv = model.get_submodule(path)
    torch.manual_seed(7)
    v1, v2 = torch.randn(conv.in_channels), torch.randn(conv.in_channels)
    filters = split.split_filter(conv.weight[channel].detach(), v1, v2, 0.5)
    src1, src2 = split.split_sources_k(torch.stack([v1, v2]), 0.5)
    assert src1.any() and src2.any()
    bias_c = None if conv.bias is None else conv.bias[channel].detach()
    ckpt = tmp_path / "ckpt.pth"
    atomic.save_torch(ckpt, split.checkpoint_state_dict(filters, bias_c))
    sd = torch.load(ckpt, weights_only=True)
    f, b = stage4.checkpoint_filters(sd)
    assert (b is None) == (conv.bias is None)

    ds = folders.image_folder(image_root, "val")
    indices = folders.indices_of_classes(ds, [0, 2])
    got = evaluate(model, conv, channel, f, b, ds, indices, batch_size=3, device="cpu",
                              num_workers=0, desc="test")

    images = torch.stack([ds[i][0] for i in indices])
    labels = torch.tensor([ds.targets[i] for i in indices])
    ref = _reference_numbers(model, path, channel, sd, images, labels)

    assert got["index"].tolist() == indices
    assert got["label"].tolist() == labels.tolist()
    for key in ("rel", "orig", "maps", "orig_pos", "maps_pos"):
        scale = max(1e-6, float(np.abs(ref[key]).max()))
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)
    assert got["maps"].shape == (len(indices), 3)
    # invariants: the split is exact; the disentangled maps are not all the same as the original
    np.testing.assert_allclose(ref["maps"][:, 0] + ref["maps"][:, 1] - ref["maps"][:, 2], ref["orig"],
                               rtol=1e-4, atol=1e-5 * float(np.abs(ref["orig"]).max()))
    assert np.abs(ref["maps"][:, 0] - ref["orig"]).max() > 1e-3 * np.abs(ref["orig"]).max()
    zl = ref["logits"]
    assert (ref["logits_disentangled"] - zl).abs().max() <= 1e-4 * max(1.0, float(zl.abs().max()))
    assert 0 < got["rel"].max() <= 1 and got["rel"].min() >= 0

    # the contact-sheet scan (forward to L only) gives the same positive masses
    scanned, orig_pos, maps_pos = scan_activations(model, conv, channel, f, b, ds, indices, 5, "cpu", 0)
    assert scanned == indices
    np.testing.assert_allclose(orig_pos, ref["orig_pos"], rtol=1e-4, atol=1e-5 * max(1e-6, ref["orig_pos"].max()))
    np.testing.assert_allclose(maps_pos, ref["maps_pos"], rtol=1e-4, atol=1e-5 * max(1e-6, ref["maps_pos"].max()))

    # the quantitative rows of these images against a loop
    tau = float(np.median(got["rel"]))
    rows = evaluation.quantitative_rows(got["maps"], got["orig"], got["rel"], tau)
    expect = [[float(got["maps"][n, j]) / float(got["orig"][n]) for j in range(3)]
              for n in range(len(indices)) if got["rel"][n] >= tau]
    assert 0 < len(expect) < len(indices) or len(set(got["rel"].tolist())) == 1
    np.testing.assert_allclose(rows, np.asarray(expect, dtype=np.float64).reshape(-1, 3), rtol=1e-12)


def test_batch_numbers_relative_attribution_is_to_the_label():
    """rel with the label differs from rel with another class: the gradient is the label's logit's."""
    model = _frozen(tiny_resnet())
    conv = model.conv3
    torch.manual_seed(8)
    images = torch.randn(4, 3, 64, 64)
    f = split.split_filter(conv.weight[2], torch.randn(24), torch.randn(24), 0.5)
    sd = split.checkpoint_state_dict(f)
    for labels in (torch.tensor([0, 1, 2, 3]), torch.tensor([3, 3, 0, 1])):
        got = batch_numbers(model, conv, 2, f, None, images, labels)
        ref = _reference_numbers(model, "conv3", 2, sd, images, labels)
        np.testing.assert_allclose(got["rel"].numpy(), ref["rel"], rtol=1e-4, atol=1e-7)
    a = batch_numbers(model, conv, 2, f, None, images, torch.tensor([0, 1, 2, 3]))["rel"]
    b = batch_numbers(model, conv, 2, f, None, images, torch.tensor([1, 2, 3, 0]))["rel"]
    assert (a - b).abs().max() > 1e-3


def test_quantitative_rows_by_hand():
    maps = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [1.0, 1.0, 1.0]])
    orig = np.array([2.0, 4.0, -1.0, 8.0])
    rel = np.array([0.03, 0.0299999, 0.5, 0.01])
    rows = evaluation.quantitative_rows(maps, orig, rel, 0.03)
    np.testing.assert_array_equal(rows, [[0.5, 1.0, 1.5], [-7.0, -8.0, -9.0]])
    assert evaluation.quantitative_rows(maps, orig, rel, 0.9).shape == (0, 3)
    assert registry.format_rows(rows) == "0.5,1.0,1.5\n-7.0,-8.0,-9.0\n"


# ---------------------------------------------------------------------------- density curves

@pytest.mark.parametrize("n,seed", [(30, 0), (7, 1), (2, 2)])
def test_kde_curve_scott_rule(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n) * 3 + 1
    xs, ys = evaluation.kde_curve(v)
    # independent: Scott's bandwidth std * n^(-1/5) (ddof=1), grid from min - 3 bw to max + 3 bw
    std = math.sqrt(sum((t - sum(v) / n) ** 2 for t in v) / (n - 1))
    bw = std * n ** (-1 / 5)
    expect_x = np.linspace(v.min() - 3 * bw, v.max() + 3 * bw, 200)
    assert len(xs) == len(ys) == 200
    np.testing.assert_allclose(xs, expect_x, rtol=1e-12, atol=1e-12)
    expect_y = np.array([sum(math.exp(-(x - t) ** 2 / (2 * bw * bw)) for t in v) / (n * bw * math.sqrt(2 * math.pi))
                         for x in expect_x])
    np.testing.assert_allclose(ys, expect_y, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ys, gaussian_kde(v, bw_method="scott")(expect_x), rtol=1e-9, atol=1e-15)
    area = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)))
    assert 0.997 <= area <= 1.0 + 1e-4  # 3 bw beyond the extreme data points: at least 99.7 % of the mass


def test_kde_curve_undefined():
    assert evaluation.kde_curve([1.5]) is None
    assert evaluation.kde_curve([2.0, 2.0, 2.0]) is None
    assert evaluation.kde_curve([]) is None


def test_filecontents_block():
    text = filecontents_block("original_c1", [0.5, 1.0], [0.25, 2e-05])
    assert text == "\\begin{filecontents*}{original_c1.dat}\n0.5 0.25\n1.0 2e-05\n\\end{filecontents*}\n"


# ---------------------------------------------------------------------------- quantitative files

def _read_rows(path):
    with open(path) as fh:
        return [[float(t) for t in line.split(",")] for line in fh.read().splitlines() if line]


def _read_means(path):
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "run,concept,images,mean_D1/orig,mean_D2/orig,mean_R/orig"
    out = {}
    for line in lines[1:]:
        run, concept, n, *m = line.split(",")
        out[(run, int(concept))] = (int(n), [float(t) for t in m])
    return out


def test_update_quantitative_no_duplicates_and_accumulation(tmp_path):
    folder = str(tmp_path / "results_quantitative")
    tau = 0.03
    rng = np.random.default_rng(0)
    a = {1: rng.normal(size=(4, 3)), 2: rng.normal(size=(2, 3))}
    b = {1: rng.normal(size=(3, 3)), 2: np.zeros((0, 3))}
    f1 = os.path.join(folder, "quantitative_concept1_required0.03.txt")
    f2 = os.path.join(folder, "quantitative_concept2_required0.03.txt")
    means = os.path.join(folder, "means_required0.03.txt")

    registry.update_quantitative(folder, "", tau, "run_a", a, {"channel": 1})
    first = (open(f1).read(), open(f2).read())
    overall = registry.update_quantitative(folder, "", tau, "run_a", a, {"channel": 1})
    assert (open(f1).read(), open(f2).read()) == first  # same key twice: no duplicate rows
    assert _read_rows(f1) == a[1].tolist() and _read_rows(f2) == a[2].tolist()  # exact round trip
    np.testing.assert_allclose(overall[1][0], a[1].mean(axis=0), rtol=1e-12)
    assert overall[1][1] == 4 and overall[2][1] == 2

    overall = registry.update_quantitative(folder, "", tau, "run_b", b, {"channel": 2})
    assert _read_rows(f1) == a[1].tolist() + b[1].tolist()
    assert _read_rows(f2) == a[2].tolist()
    all1 = np.concatenate([a[1], b[1]])
    np.testing.assert_allclose(overall[1][0], all1.mean(axis=0), rtol=1e-12)
    assert overall[1][1] == 7
    m = _read_means(means)
    assert m[("ALL", 1)][0] == 7 and m[("ALL", 2)][0] == 2
    np.testing.assert_allclose(m[("ALL", 1)][1], all1.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[("ALL", 2)][1], a[2].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[("run_a", 1)][1], a[1].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[("run_b", 1)][1], b[1].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert m[("run_b", 2)][0] == 0 and all(math.isnan(t) for t in m[("run_b", 2)][1])

    # rerunning run_a with new rows replaces its rows, keeps run_b's
    a2 = {1: rng.normal(size=(1, 3)), 2: rng.normal(size=(3, 3))}
    registry.update_quantitative(folder, "", tau, "run_a", a2, {"channel": 1})
    assert _read_rows(f1) == a2[1].tolist() + b[1].tolist()
    assert _read_rows(f2) == a2[2].tolist()
    m = _read_means(means)
    np.testing.assert_allclose(m[("ALL", 1)][1], np.concatenate([a2[1], b[1]]).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[("ALL", 2)][1], a2[2].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert sorted(k for k in m if k[0] != "ALL") == [("run_a", 1), ("run_a", 2), ("run_b", 1), ("run_b", 2)]
    # other tau values go to their own files
    registry.update_quantitative(folder, "", 0.1, "run_a", a, {})
    assert _read_rows(os.path.join(folder, "quantitative_concept1_required0.1.txt")) == a[1].tolist()
    assert _read_rows(f1) == a2[1].tolist() + b[1].tolist()


def test_update_quantitative_empty_concept(tmp_path):
    overall = registry.update_quantitative(str(tmp_path), "", 0.03, "k", {1: np.ones((2, 3)), 2: np.zeros((0, 3))}, {})
    assert overall[2] == (None, 0)
    m = _read_means(str(tmp_path / "means_required0.03.txt"))
    assert m[("ALL", 2)][0] == 0 and all(math.isnan(t) for t in m[("ALL", 2)][1])
    assert m[("ALL", 1)] == (2, [1.0, 1.0, 1.0])
    assert open(tmp_path / "quantitative_concept2_required0.03.txt").read() == ""


# ---------------------------------------------------------------------------- top-k

def test_top_k_against_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=40).astype(float)  # many ties
    s[7] = np.inf
    expect_order = sorted(range(40), key=lambda i: (-s[i], i))
    for k in (1, 3, 10, 40, 55):
        got = evaluation.top_k(s, k)
        assert got.tolist() == expect_order[:k]
    assert evaluation.top_k([1.0, 3.0, 3.0, 2.0], 2).tolist() == [1, 2]
    assert evaluation.top_k([-1.0, -1.0], 1).tolist() == [0]


@pytest.mark.slow
def test_evaluate_many_gives_each_run_bit_for_bit_what_evaluate_gives(image_root):
    """One pass for three (channel, checkpoint, classes) runs over the union of their classes' val images:
    each run's arrays equal ``evaluate`` of that run alone, bit for bit (batches of one class each)."""
    model = _frozen(tiny_resnet())
    conv = model.conv3
    ds = folders.image_folder(image_root, "val")
    torch.manual_seed(10)
    runs = []
    for channel, classes in ((1, [0, 1]), (5, [2, 3]), (7, [0, 2, 1])):
        v1, v2 = torch.randn(conv.in_channels), torch.randn(conv.in_channels)
        runs.append((channel, split.split_filter(conv.weight[channel].detach(), v1, v2, 0.5), None, classes))
    union = folders.indices_of_classes(ds, [0, 1, 2, 3])
    many = stage4.evaluate_many(model, conv, runs, ScanPlan(ds, 3), union, desc="test")
    for (channel, f, b, classes), got in zip(runs, many):
        alone = evaluate(model, conv, channel, f, b, ds, folders.indices_of_classes(ds, classes), 3, "cpu", 0,
                                    desc="test")
        assert sorted(got) == sorted(alone)
        for key in got:
            assert np.array_equal(got[key], alone[key]), key
        assert got["index"].tolist() == folders.indices_of_classes(ds, classes)
    scanned, pos = stage4.scan_many(model, conv, [r[:3] for r in runs], ScanPlan(ds, 5), union)
    for (channel, f, b, _), (orig_pos, maps_pos) in zip(runs, pos):
        s1, o1, m1 = scan_activations(model, conv, channel, f, b, ds, union, 5, "cpu", 0)
        assert s1 == scanned == union and np.array_equal(o1, orig_pos) and np.array_equal(m1, maps_pos)


# ---------------------------------------------------------------------------- separations, names of the files

def test_concept_separation_by_hand():
    """sep_j = mean pos(D_j) / max over l != j of mean pos(D_l) over concept j's images (R never counts)."""
    maps_pos = np.array([[4.0, 1.0, 2.0, 9.0],   # concept 1
                         [2.0, 3.0, 0.0, 9.0],   # concept 1
                         [0.0, 1.0, 6.0, 9.0],   # concept 3
                         [5.0, 5.0, 5.0, 5.0]])  # no concept
    orig_pos = np.array([1.0, 3.0, 7.0, 0.0])
    concept = np.array([1, 1, 3, 0])
    n, sep, orig, means = evaluation.concept_separation(orig_pos, maps_pos, concept, 1)
    assert (n, orig, means) == (2, 2.0, [3.0, 2.0, 1.0, 9.0]) and sep == 3.0 / 2.0
    n, sep, orig, means = evaluation.concept_separation(orig_pos, maps_pos, concept, 3)
    assert (n, sep, orig, means) == (1, 6.0, 7.0, [0.0, 1.0, 6.0, 9.0])
    assert evaluation.concept_separation(orig_pos, maps_pos, concept, 2) == (0, None, None, [None] * 4)
    # no other map active: the denominator is 0, the separation unbounded (None, with a reason), never 2 / 1e-12
    n, sep, _, means = evaluation.concept_separation(np.ones(1), np.array([[2.0, 0.0, 5.0]]), np.array([1]), 1)
    assert sep is None and evaluation.separation_reason(n, means, 1).startswith("unbounded: mean pos(D2) over "
                                                                                 "concept 1's 1 val images is 0")
    n, sep, _, means = evaluation.concept_separation(np.ones(1), np.array([[0.0, 0.0, 5.0]]), np.array([1]), 1)
    assert sep is None and evaluation.separation_reason(n, means, 1).startswith("undefined")
    assert evaluation.separation_reason(0, [None] * 3, 2) == "concept 2 has no val image"
    assert evaluation.separation_reason(2, [3.0, 2.0, 1.0, 9.0], 1) is None  # a finite separation has no reason
    assert evaluation.map_names(3) == ("D1", "D2", "D3", "R")


def test_registry_files_of_a_layer_and_of_k_concepts_stay_apart(tmp_path):
    """The published files (last conv, k = 2), another layer's and a k = 3 run's are separate registries."""
    folder = str(tmp_path)
    two, three = {1: np.ones((1, 3)), 2: np.ones((2, 3))}, {j: np.full((j, 4), float(j)) for j in (1, 2, 3)}
    assert names.registry_prefix("m", "m", 2) == "" and names.registry_prefix("m_l2", "m", 3) == "m_l2_k3_"
    registry.update_quantitative(folder, names.registry_prefix("m", "m", 2), 0.03, "a", two, {})
    overall = registry.update_quantitative(folder, names.registry_prefix("m_l2", "m", 3), 0.03, "b", three, {})
    assert sorted(os.listdir(folder)) == sorted(
        [".runs_required0.03.lock", "runs_required0.03.json", "means_required0.03.txt",
         "quantitative_concept1_required0.03.txt", "quantitative_concept2_required0.03.txt",
         ".runs_m_l2_k3_required0.03.lock", "runs_m_l2_k3_required0.03.json", "means_m_l2_k3_required0.03.txt"]
        + [f"quantitative_m_l2_k3_concept{j}_required0.03.txt" for j in (1, 2, 3)])
    assert _read_rows(os.path.join(folder, "quantitative_m_l2_k3_concept3_required0.03.txt")) == [[3.0] * 4] * 3
    assert [overall[j][1] for j in (1, 2, 3)] == [1, 2, 3] and overall[2][0].tolist() == [2.0] * 4
    assert open(os.path.join(folder, "means_m_l2_k3_required0.03.txt")).read().splitlines()[0] == \
        "run,concept,images,mean_D1/orig,mean_D2/orig,mean_D3/orig,mean_R/orig"


def test_checkpoint_places():
    assert names.checkpoint_places("/s", "x.pth") == ["/s/models_disentangled/x.pth", "/s/x.pth"]
