"""Stage-3 math: the split rule, the checkpoint tensors and names, the exactness of the disentangled
network, and the single-pass best-rho scores against an explicit per-rho loop over full networks."""
import pytest
import torch
import torch.nn as nn
import torchvision

from types import SimpleNamespace

from tests.tiny_models import tiny_resnet, tiny_vgg
from utils import disentangle
from utils.files import names
from utils.method import attribution, rho_scores, similarities, split
from utils.method.split import RHOS
from utils.model import tap
from utils.stages import stage3

PAPER_RHOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
             0.85, 0.9, 0.95, 1.0]


def split_sources(v1, v2, rho):
    """Two concepts (``split_sources_k`` with k = 2): (src1, src2) bool (C_in,)."""
    src = split.split_sources_k(torch.stack([v1, v2]), rho)
    return src[0], src[1]


def split_filters(weight_c, v1, v2):
    """[D1, D2, R] of every rho: (20, 3, C_in, kh, kw)."""
    return split.split_filters_k(weight_c, torch.stack([v1, v2]))


def max_logit_difference(model, disentangled, images):
    """max |z' - z| and max |z| of the two networks' logits on ``images``."""
    return disentangle.logit_difference(disentangle.logits(model, images), disentangle.logits(disentangled, images))


def scan_batches(model, conv, images, cuts):
    """What the scan yields for ``images`` cut at ``cuts``: the layer's input x, output a and dataset indices."""
    out, edges = [], [0, *cuts, len(images)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        x, a = tap.layer_input_output(model, conv, images[lo:hi])
        out.append(SimpleNamespace(x=x.float(), a=a, indices=torch.arange(lo, hi)))
    return out


def rows_of(labels, classes):
    """Dataset indices (positions) of the images whose label is in ``classes``."""
    return [n for n in range(len(labels)) if int(labels[n]) in classes]


def _frozen(model):
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------- hand-built example

# five input channels, kernel 1x2: W[c][k] = [[2k+1, 2k+2]]
W_C = torch.arange(1.0, 11.0).reshape(5, 1, 2)
V1 = torch.tensor([4.0, 1.0, 2.0, -1.0, 0.0])
V2 = torch.tensor([1.0, 4.0, 1.0, -1.0, 0.0])
# worked out by hand from "rho*v1[k] > v2[k] -> source1, else rho*v2[k] > v1[k] -> source2, else neither":
#   k=0: (4, 1)   rho=0.5: 2 > 1 -> s1        rho=1: 4 > 1 -> s1       rho=0.2: 0.8 > 1 no, 0.2 > 4 no -> neither
#   k=1: (1, 4)   rho=0.5: 0.5 > 4 no, 2 > 1 -> s2   rho=1: s2         rho=0.2: 0.2 > 4 no, 0.8 > 1 no -> neither
#   k=2: (2, 1)   rho=0.5: 1 > 1 no (strict), 0.5 > 2 no -> neither    rho=1: 2 > 1 -> s1    rho=0.2: neither
#   k=3: (-1, -1) rho<1: -rho > -1 -> s1 (both tests hold; the first wins)  rho=1: -1 > -1 no twice -> neither
#   k=4: (0, 0)   never
HAND = {
    0.5: ([0, 3], [1]),
    1.0: ([0, 2], [1]),
    0.2: ([3], []),
    0.05: ([3], []),
}


def _mask_rows(w, rows):
    w = w.clone()
    w[rows] = 0
    return w


@pytest.mark.parametrize("rho", list(HAND))
def test_split_rule_by_hand(rho):
    s1, s2 = HAND[rho]
    src1, src2 = split_sources(V1, V2, rho)
    assert torch.nonzero(src1).flatten().tolist() == s1
    assert torch.nonzero(src2).flatten().tolist() == s2
    D = split.split_filter(W_C, V1, V2, rho)
    assert D.shape == (3, 5, 1, 2)
    assert torch.equal(D[0], _mask_rows(W_C, s2))
    assert torch.equal(D[1], _mask_rows(W_C, s1))
    assert torch.equal(D[2], _mask_rows(W_C, s1 + s2))


def test_split_rule_literal_tensors_rho_half():
    D = split.split_filter(W_C, V1, V2, 0.5)
    expect_D1 = torch.tensor([[[1., 2.]], [[0., 0.]], [[5., 6.]], [[7., 8.]], [[9., 10.]]])
    expect_D2 = torch.tensor([[[0., 0.]], [[3., 4.]], [[5., 6.]], [[0., 0.]], [[9., 10.]]])
    expect_R = torch.tensor([[[0., 0.]], [[0., 0.]], [[5., 6.]], [[0., 0.]], [[9., 10.]]])
    assert torch.equal(D, torch.stack([expect_D1, expect_D2, expect_R]))


def test_split_exact_for_all_rhos():
    assert RHOS == PAPER_RHOS
    torch.manual_seed(0)
    w = torch.randn(16, 3, 3)
    v1, v2 = torch.randn(16), torch.randn(16)
    all_f = split_filters(w, v1, v2)
    assert all_f.shape == (20, 3, 16, 3, 3)
    nontrivial = 0
    for r, rho in enumerate(RHOS):
        D1, D2, R = all_f[r]
        assert torch.equal(all_f[r], split.split_filter(w, v1, v2, rho))
        assert torch.equal(D1 + D2 - R, w)
        # each input channel is in at most one source; R keeps exactly the inputs in neither
        src1, src2 = split_sources(v1, v2, rho)
        assert not (src1 & src2).any()
        for k in range(16):
            in1 = bool(rho * v1[k] > v2[k])
            in2 = (not in1) and bool(rho * v2[k] > v1[k])
            assert bool(src1[k]) == in1 and bool(src2[k]) == in2
            assert torch.equal(D1[k], torch.zeros_like(w[k]) if in2 else w[k])
            assert torch.equal(D2[k], torch.zeros_like(w[k]) if in1 else w[k])
            assert torch.equal(R[k], torch.zeros_like(w[k]) if (in1 or in2) else w[k])
        nontrivial += bool(src1.any() and src2.any())
    assert nontrivial > 5


def test_checkpoint_state_dict_keys_shapes_and_bias():
    D = split.split_filter(W_C, V1, V2, 0.5)
    sd = split.checkpoint_state_dict(D)
    assert list(sd) == ["disentangled.weight", "merged.weight"]
    assert torch.equal(sd["disentangled.weight"], D)
    assert sd["merged.weight"].shape == (1, 3, 1, 1)
    assert sd["merged.weight"].flatten().tolist() == [1.0, 1.0, -1.0]
    sdb = split.checkpoint_state_dict(D, torch.tensor(0.75))
    assert set(sdb) == {"disentangled.weight", "disentangled.bias", "merged.weight"}
    assert sdb["disentangled.bias"].shape == (3,)
    assert sdb["disentangled.bias"].tolist() == [0.75, 0.75, 0.75]
    # D1 + D2 - R with the merge weights, bias included, gives back W[c] and b[c]
    m = sdb["merged.weight"].flatten()
    assert torch.equal(m[0] * D[0] + m[1] * D[1] + m[2] * D[2], W_C)
    assert float((m * sdb["disentangled.bias"]).sum()) == 0.75


@pytest.mark.parametrize("with_bias", [False, True])
def test_checkpoint_as_published_module_reproduces_the_channel(tmp_path, with_bias):
    """The saved file loads (strict) into a module with ``disentangled`` (C_in -> 3) and ``merged`` (3 -> 1)
    convs, and that module computes channel c of the original layer."""
    from utils.files import atomic
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 4, (1, 2), stride=(2, 1), padding=(1, 0), bias=with_bias)
    c = 2
    with torch.no_grad():
        conv.weight[c] = W_C
    D = split.split_filter(conv.weight[c].detach(), V1, V2, 0.5)
    path = tmp_path / names.class_checkpoint("tiny", c, [[0], [1]], 0.5)
    atomic.save_torch(path, split.checkpoint_state_dict(D, conv.bias[c].detach() if with_bias else None))
    sd = torch.load(path, weights_only=True)

    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.disentangled = nn.Conv2d(5, 3, (1, 2), stride=(2, 1), padding=(1, 0), bias=with_bias)
            self.merged = nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x):
            return self.merged(self.disentangled(x))

    mod = Published()
    mod.load_state_dict(sd, strict=True)
    x = torch.randn(2, 5, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), conv(x)[:, c:c + 1], rtol=1e-5, atol=1e-5)


def test_checkpoint_names():
    assert names.class_checkpoint("resnet50", 1660, [[530], [938]], 0.05) == \
        "resnet50_channel1660_classes1[530]_classes2[938]_f0.05_unnormalized.pth"
    assert names.class_checkpoint("resnet50", 1660, [[530], [938]], "best") == \
        "resnet50_channel1660_classes1[530]_classes2[938]_f_best_unnormalized.pth"
    assert names.class_checkpoint("resnet50", 522, [[62, 61], [687]], 1.0) == \
        "resnet50_channel522_classes1[62, 61]_classes2[687]_f1.0_unnormalized.pth"
    got = [names.class_checkpoint("m", 0, [[1], [2]], r) for r in RHOS]
    assert [n.split("_f")[1].split("_unnormalized")[0] for n in got] == [str(r) for r in PAPER_RHOS]
    assert "m_channel0_classes1[1]_classes2[2]_f0.35_unnormalized.pth" in got
    assert len(set(got)) == 20
    best = "/s/models_disentangled/" + names.class_checkpoint("m_features.6", 0, [[1], [2]], "best")
    assert names.info_file(best) == "/s/models_disentangled/m_features.6_channel0_classes1[1]_classes2[2]_info.json"
    assert names.exported_model(best)[1].endswith("classes2[2]_f_best_model.json")


# ---------------------------------------------------------------------------- the disentangled network

def _resnet18():
    torch.manual_seed(3)
    return _frozen(torchvision.models.resnet18(weights=None, num_classes=4))


CASES = {
    "tiny_resnet_conv3": (lambda: _frozen(tiny_resnet()), "conv3", 5, (6, 3, 64, 64)),
    "tiny_resnet_conv2": (lambda: _frozen(tiny_resnet()), "conv2", 7, (6, 3, 64, 64)),
    "resnet18_layer4.1.conv2": (_resnet18, "layer4.1.conv2", 100, (4, 3, 64, 64)),
    "tiny_vgg_features.6_bias": (lambda: _frozen(tiny_vgg()), "features.6", 3, (4, 3, 209, 209)),
}


def _concept_arvs(model, conv, images, labels, classes1, classes2, c):
    """v1, v2 as stage 3 computes them: closed-form ARVs from the concepts' mean patch sums."""
    P = attribution.conv_patch_sums(tap.layer_input(model, conv, images), conv)
    w_c = conv.weight[c].detach()
    v = []
    for classes in (classes1, classes2):
        rows = [n for n in range(len(labels)) if int(labels[n]) in classes]
        v.append(similarities.arv(w_c, similarities.rows_mean_patch_sums(P.numpy(), rows)).float())
    return v


@pytest.mark.parametrize("case", list(CASES))
def test_disentangled_network_is_exact_and_rows_are_placed(case):
    make, path, c, shape = CASES[case]
    model = make()
    conv = model.get_submodule(path)
    torch.manual_seed(4)
    images = torch.randn(shape)
    labels = torch.arange(shape[0]) % 2
    v1, v2 = _concept_arvs(model, conv, images, labels, [0], [1], c)
    all_f = split_filters(conv.weight[c].detach(), v1, v2)
    # the first rho whose split is non-trivial (both sources non-empty)
    r = next((r for r, rho in enumerate(RHOS)
              if all(s.any() for s in split_sources(v1, v2, rho))), None)
    assert r is not None
    src1, src2 = split_sources(v1, v2, RHOS[r])
    assert src1.any() and src2.any()
    bias_c = None if conv.bias is None else conv.bias[c].detach()
    sd = split.checkpoint_state_dict(all_f[r], bias_c)
    w_before = conv.weight.detach().clone()

    dm = disentangle.disentangled_model(model, path, c, sd)

    with torch.no_grad():
        z = model(images)
        z2 = dm(images)
    assert (z2 - z).abs().max() <= 1e-4 * max(1.0, float(z.abs().max()))
    assert torch.equal(conv.weight, w_before)  # the original model is untouched
    assert model.get_submodule(path) is conv

    seq = dm.get_submodule(path)
    assert isinstance(seq, nn.Sequential) and len(seq) == 2
    lp, merge = seq
    c_out = conv.out_channels
    assert lp.out_channels == c_out + 2 and lp.in_channels == conv.in_channels
    assert (lp.kernel_size, lp.stride, lp.padding, lp.dilation) == \
        (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    D1, D2, R = all_f[r]
    for row in range(c_out):
        expect = D1 if row == c else conv.weight[row]
        assert torch.equal(lp.weight[row], expect)
    assert torch.equal(lp.weight[c_out], D2) and torch.equal(lp.weight[c_out + 1], R)
    if conv.bias is None:
        assert lp.bias is None
    else:
        assert torch.equal(lp.bias[:c_out], conv.bias)
        assert torch.equal(lp.bias[c_out:], conv.bias[c].repeat(2))
    assert merge.bias is None and merge.kernel_size == (1, 1)
    M = torch.zeros(c_out, c_out + 2)
    for i in range(c_out):
        M[i, i] = 1.0
    M[c, c_out] = 1.0
    M[c, c_out + 1] = -1.0
    assert torch.equal(merge.weight[:, :, 0, 0], M)
    # the disentangled maps really differ from the original channel (the split did something)
    store = {}
    h = lp.register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    with torch.no_grad():
        dm(images)
    h.remove()
    o = store["o"]
    assert not torch.allclose(o[:, c], o[:, c_out])


# ---------------------------------------------------------------------------- best rho

def _reference_scores(model, path, c, all_f, bias_c, images, labels, classes1, classes2):
    """score(rho) one rho at a time: build the full disentangled model, read D1 and D2 from L' by a hook."""
    c_out = model.get_submodule(path).out_channels
    scores = []
    for r in range(len(RHOS)):
        dm = disentangle.disentangled_model(model, path, c, split.checkpoint_state_dict(all_f[r], bias_c))
        store = {}
        h = dm.get_submodule(path)[0].register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
        with torch.no_grad():
            dm(images)
        h.remove()
        out = store["o"].double()
        q1, q2 = [], []
        for n in range(len(images)):
            p1 = float(out[n, c].clamp_min(0).sum())
            p2 = float(out[n, c_out].clamp_min(0).sum())
            if int(labels[n]) in classes1:
                q1.append(p1 / (p2 + 1e-5))
            elif int(labels[n]) in classes2:
                q2.append(p2 / (p1 + 1e-5))
        scores.append(sum(q1) / len(q1) + sum(q2) / len(q2))
    return scores


@pytest.mark.parametrize("case", ["tiny_resnet_conv2", "tiny_vgg_features.6_bias"])
def test_single_pass_scores_equal_per_rho_full_networks(case):
    make, path, c, shape = CASES[case]
    model = make()
    conv = model.get_submodule(path)
    torch.manual_seed(6)
    n = 9
    images = torch.randn((n,) + shape[1:])
    labels = torch.tensor([0, 1, 2, 1, 0, 3, 2, 1, 0])  # class 3 is in neither concept: ignored
    classes1, classes2 = [0, 2], [1]
    v1, v2 = _concept_arvs(model, conv, images, labels, classes1, classes2, c)
    all_f = split_filters(conv.weight[c].detach(), v1, v2)
    bias_c = None if conv.bias is None else conv.bias[c].detach()
    batches = scan_batches(model, conv, images, [4])  # uneven batches

    scores = rho_scores.score_splits(conv, [rho_scores.Split(None, all_f, bias_c, [rows_of(labels, classes1),
                                                                                  rows_of(labels, classes2)])],
                                     batches, "cpu")[0].scores
    ref = _reference_scores(model, path, c, all_f, bias_c, images, labels, classes1, classes2)

    assert scores.dtype == torch.float64 and scores.shape == (20,)
    torch.testing.assert_close(scores, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert max(ref) - min(ref) > 1e-3 * max(ref)  # the rhos do differ
    best = rho_scores.best_rho_index(scores)
    top = max(ref)
    near = [r for r, s in enumerate(ref) if s >= top - 1e-5 * abs(top)]
    assert best == near[0]


@pytest.mark.slow
def test_score_images_channels_last_equal_per_rho_full_networks(image_root):
    """Stage 3's pass over a generated ImageFolder (class batches of 4, channels-last model and images) against
    the per-rho full disentangled networks on the same images in the default layout; scoring the concepts'
    images alone or among another class's images gives the same bytes (batches never mix classes)."""
    import copy

    from utils.data import folders
    make, path, c, _ = CASES["tiny_resnet_conv2"]
    model = make()
    conv = model.get_submodule(path)
    ds = folders.image_folder(image_root, "train")
    indices = list(range(len(ds)))
    labels = torch.tensor(ds.targets)
    images = torch.stack([ds[i][0] for i in indices])
    classes1, classes2 = [0, 2], [1]  # class 3 is in neither concept
    v1, v2 = _concept_arvs(model, conv, images, labels, classes1, classes2, c)
    all_f = split_filters(conv.weight[c].detach(), v1, v2)
    one = rho_scores.Split(c, all_f, None, [rows_of(labels, classes1), rows_of(labels, classes2)])
    ref = _reference_scores(model, path, c, all_f, None, images, labels, classes1, classes2)

    flat = copy.deepcopy(model)
    settings = SimpleNamespace(batch_size=4, num_workers=0, channels_last=False)
    plain, = stage3.score_images(SimpleNamespace(model=flat, conv=flat.get_submodule(path), dataset=ds, device="cpu"),
                                 [one], indices, settings)
    ctx = SimpleNamespace(model=model, conv=conv, dataset=ds, device="cpu")
    got, = stage3.score_images(ctx, [one], indices, SimpleNamespace(**dict(settings.__dict__, channels_last=True)))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    torch.testing.assert_close(got.scores, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.scores, plain.scores, rtol=1e-5, atol=1e-6)
    assert got.images == [12, 6] and split.within_tolerance(got.max_map_diff, got.max_abs_map)
    mine = [i for i in indices if ds.targets[i] in classes1 + classes2]
    alone, = stage3.score_images(ctx, [one], mine, SimpleNamespace(**dict(settings.__dict__, channels_last=True)))
    assert torch.equal(alone.scores, got.scores) and torch.equal(alone.pos, got.pos)


def test_best_rho_index_first_maximum():
    assert rho_scores.best_rho_index([1.0, 3.0, 3.0, 2.0]) == 1
    s = [0.5] * 20
    s[12] = 2.0
    s[5] = 2.0
    assert rho_scores.best_rho_index(s) == 5
    assert rho_scores.best_rho_index(torch.tensor(s)) == 5
    assert rho_scores.best_rho_index([7.0] * 20) == 0
    assert rho_scores.best_rho_index([1.0, 1.0 + 1e-12, 1.0 + 1e-12]) == 1  # float64, not float32
    assert rho_scores.best_rho_index([3.0, 1.0, 2.0]) == 0
    assert rho_scores.best_rho_index([-3.0, -1.0, -2.0]) == 1


def test_separation_terms_and_scores_by_hand():
    # two rhos; pos = [D1, D2, R] masses
    pos = torch.tensor([[[2.0, 1.0, 9.0], [0.0, 4.0, 9.0]],     # concept 1 image
                        [[1.0, 3.0, 9.0], [5.0, 0.0, 9.0]]])    # concept 2 image
    terms = rho_scores.separation_terms(pos, torch.tensor([1, 2]))
    expect = torch.tensor([[2.0 / (1 + 1e-5), 0.0], [3.0 / (1 + 1e-5), 0.0 / (5 + 1e-5)]])
    torch.testing.assert_close(terms, expect)
    pos_zero = torch.tensor([[[2.0, 0.0, 0.0]]])
    assert float(rho_scores.separation_terms(pos_zero, torch.tensor([1]))[0, 0]) == pytest.approx(2.0 / 1e-5)
    sc = rho_scores.rho_scores_k([torch.tensor([4.0, 2.0]), torch.tensor([3.0, 9.0])], [2, 3])
    torch.testing.assert_close(sc, torch.tensor([4.0 / 2 + 3.0 / 3, 2.0 / 2 + 9.0 / 3]))
    labels = torch.tensor([5, 0, 7, 2, 1])
    assert rho_scores.concept_ids(labels, [[0, 7], [2]]).tolist() == [0, 1, 1, 2, 0]


# ---------------------------------------------------------------------------- exactness checks of stage 3

def _hooked_x_a(model, conv, images):
    """x and a of the layer from a plain hook on the whole forward pass (not stopped)."""
    keep = {}
    h = conv.register_forward_hook(lambda m, i, o: keep.update(x=i[0].detach(), a=o.detach()))
    with torch.no_grad():
        model(images)
    h.remove()
    return keep["x"], keep["a"]


@pytest.mark.parametrize("case", ["tiny_resnet_conv2", "tiny_vgg_features.6_bias"])
def test_score_splits_exactness_values_against_brute_force(case):
    """max |D1 + D2 - R - a[c]| and max |a[c]| of each split, over its concepts' images and every rho, against
    a float64 loop over images, rhos and single filters; one split deliberately inexact (D1 scaled by 1.5).
    Several splits in one pass give each split's scores bit for bit as alone."""
    make, path, c, shape = CASES[case]
    model = make()
    conv = model.get_submodule(path)
    torch.manual_seed(8)
    images = torch.randn((9,) + shape[1:])
    labels = torch.tensor([0, 1, 2, 1, 0, 3, 2, 1, 3])
    c2 = (c + 1) % conv.out_channels
    concepts = {c: ([0, 2], [1]), c2: ([3], [1])}
    splits = []
    for ch, (k1, k2) in concepts.items():
        v1, v2 = _concept_arvs(model, conv, images, labels, k1, k2, ch)
        f = split_filters(conv.weight[ch].detach(), v1, v2)
        if ch == c2:
            f = f.clone()
            f[:, 0] *= 1.5  # no longer D1 + D2 - R = W[c2]
        splits.append(rho_scores.Split(ch, f, None if conv.bias is None else conv.bias[ch].detach(),
                                       [rows_of(labels, k1), rows_of(labels, k2)]))
    batches = scan_batches(model, conv, images, [4])  # uneven, mixed batches

    got = rho_scores.score_splits(conv, splits, batches, "cpu")

    x, a = _hooked_x_a(model, conv, images)
    for (k1, k2), s, res in zip(concepts.values(), splits, got):
        inside = [n for n in range(9) if int(labels[n]) in k1 + k2]
        assert res.images == [sum(int(labels[n]) in k1 for n in inside), sum(int(labels[n]) in k2 for n in inside)]
        diff, amax = 0.0, 0.0
        for n in inside:
            a_c = a[n, s.channel].double()
            amax = max(amax, float(a_c.abs().max()))
            for r in range(len(RHOS)):
                m = [F_conv(x[n:n + 1], conv, s.filters[r, j], s.bias_c) for j in range(3)]
                diff = max(diff, float((m[0] + m[1] - m[2] - a_c).abs().max()))
        assert res.max_abs_map == pytest.approx(amax, rel=1e-6)
        if s.channel == c2:
            assert diff > 1e-2 * amax
            assert res.max_map_diff == pytest.approx(diff, rel=1e-4)
            assert not split.within_tolerance(res.max_map_diff, res.max_abs_map)
        else:
            assert diff <= 1e-5 * max(1.0, amax) and res.max_map_diff <= 1e-5 * max(1.0, amax)
            assert split.within_tolerance(res.max_map_diff, res.max_abs_map)
    alone = rho_scores.score_splits(conv, splits[:1], batches, "cpu")[0]
    assert torch.equal(alone.scores, got[0].scores) and alone.max_map_diff == got[0].max_map_diff


def F_conv(x, conv, w, b):
    """One filter on x in float64 with the layer's geometry: (1, C_in, H, W) -> (H', W')."""
    out = torch.nn.functional.conv2d(x.double(), w[None].double(), None if b is None else b.reshape(1).double(),
                                     conv.stride, conv.padding, conv.dilation)
    return out[0, 0]


def test_network_check_swaps_the_layer_in_place_and_restores_it():
    model = _frozen(tiny_resnet())
    conv = model.conv3
    torch.manual_seed(9)
    images = torch.randn(4, 3, 64, 64)
    w = conv.weight[5].detach()
    sd = split.checkpoint_state_dict(split.split_filter(w, torch.randn(24), torch.randn(24), 0.5))
    bad = dict(sd, **{"merged.weight": torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1)})  # adds R instead of -R
    z0 = disentangle.logits(model, images)
    for state, exact in ((sd, True), (bad, False)):
        diff, zmax, z = disentangle.network_check(model, "conv3", 5, state, images)
        ref_diff, ref_max = max_logit_difference(
            model, disentangle.disentangled_model(model, "conv3", 5, state), images)
        assert diff == pytest.approx(ref_diff, rel=1e-6, abs=1e-7) and zmax == ref_max
        assert torch.equal(z, z0)
        assert split.within_tolerance(diff, zmax) == exact
        assert disentangle.network_check(model, "conv3", 5, state, images, original_logits=z)[0] == diff
        assert model.conv3 is conv and torch.equal(disentangle.logits(model, images), z0)  # put back
    assert ref_diff > 1e-4  # the bad merge is seen

