"""k >= 2 concepts (docs/method.md, 'Splitting a channel', issue 11) and the robust best-rho score (issue 13.2).

The split rule, the checkpoint and sum_j D_j - (k-1) R = W[c] on hand-built ARVs with known answers; the
k-way network's logits against the original's; the single-pass k-way scores against a per-rho loop over
full networks; the robust score and the degeneracy warning on hand-built masses; stages 3 and 4 through
their command lines: k = 2 files byte for byte those of the code before k-way (its checked-in digests), k = 3 by
classes and by a concepts file, and bad input refused in one line with nothing damaged.
"""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests import digests
from tests.conftest import make_image_folder, tree_bytes
from tests.test_cli import run_inproc
from tests.test_disentangle import max_logit_difference, scan_batches
from tests.tiny_models import tiny_resnet, tiny_vgg
from utils.method import clustering
from utils import disentangle
from utils.concepts.by_classes import Triple
from utils.files import names, store
from utils.method import attribution, rho_scores, similarities, split
from utils.method.split import RHOS
from utils.model import tap
from utils.report import stage3_text

TINY = "tests.tiny_models:tiny_resnet"
TAG = "tests_tiny_models_tiny_resnet"
MODEL = ["--model", TINY, "--batch_size", 4, "--num_workers", 0, "--device", "cpu"]
# the commit before k-way: the digests of the files its stages 3 and 4 write are tests/digests/a34598c.json
BEFORE_KWAY = "a34598c"


def published_scores(pos, concept):
    """The published score of every rho from per-image masses (float64): sum_j mean over concept j's images
    of q_j. pos: (N, R, k+1); concept: (N,) in 0..k. Returns (R,)."""
    k = pos.shape[-1] - 1
    terms = rho_scores.separation_terms(pos, concept).double()
    return rho_scores.rho_scores_k([terms[concept == j].sum(dim=0) for j in range(1, k + 1)],
                                   [int((concept == j).sum()) for j in range(1, k + 1)])


def _frozen(model):
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def _bytes(t):
    return t.contiguous().numpy().tobytes()


# ---------------------------------------------------------------------------- the split rule by hand

# k = 3, six input channels; worked out from "first j with rho*v_j[i] > max_{l!=j} v_l[i]":
#   i=0 (4,1,1): rho=.5: 2 > 1 -> 1             rho=1: 4 > 1 -> 1
#   i=1 (1,4,1): rho=.5: .5 > 4 no; 2 > 1 -> 2   rho=1: -> 2
#   i=2 (1,1,4): rho=.5: -> 3                    rho=1: -> 3
#   i=3 (-1,-1,-1): rho=.5: -.5 > -1 holds for every j: the first wins -> 1;   rho=1: -1 > -1 never -> N
#   i=4 (2,2,1): rho=.5: 1 > 2, 1 > 2, .5 > 2 no -> N;  rho=1: 2 > 2 (tie) no, 2 > 2 no, 1 > 2 no -> N
#   i=5 (0,0,0): never -> N
V3 = torch.tensor([[4.0, 1.0, 1.0, -1.0, 2.0, 0.0],
                   [1.0, 4.0, 1.0, -1.0, 2.0, 0.0],
                   [1.0, 1.0, 4.0, -1.0, 1.0, 0.0]])
HAND3 = {0.5: [[0, 3], [1], [2]], 1.0: [[0], [1], [2]]}
# k = 4, five input channels:
#   i=0 (-2,-2,-2,-2): rho=.5: -1 > -2 for every j -> 1 (first);  rho=1: never -> N
#   i=1 (1,5,5,0): rho=.5: 2.5 > 5 no (twice) -> N;  rho=1: 5 > 5 (tie) no -> N
#   i=2 (0,0,0,3): rho=.5: 1.5 > 0 -> 4;  rho=1: -> 4
#   i=3 (3,1,2,2.5): rho=.5: 1.5 > 2.5 no, .5 > 3, 1 > 3, 1.25 > 3 no -> N;  rho=1: 3 > 2.5 -> 1
#   i=4 (-1,0,-3,-2): rho=.5: -.5 > 0 no; 0 > -1 -> 2;  rho=1: 0 > -1 -> 2
V4 = torch.tensor([[-2.0, 1.0, 0.0, 3.0, -1.0],
                   [-2.0, 5.0, 0.0, 1.0, 0.0],
                   [-2.0, 5.0, 0.0, 2.0, -3.0],
                   [-2.0, 0.0, 3.0, 2.5, -2.0]])
HAND4 = {0.5: [[0], [4], [], [2]], 1.0: [[3], [4], [], [2]]}


@pytest.mark.parametrize("arvs,hand", [(V3, HAND3), (V4, HAND4)], ids=["k3", "k4"])
def test_split_rule_by_hand(arvs, hand):
    k, c_in = arvs.shape
    torch.manual_seed(0)
    w = torch.randn(c_in, 2, 3)
    w[0, 0, 0] = -0.0  # a signed zero survives the masks as it is
    for rho, sources in hand.items():
        src = split.split_sources_k(arvs, rho)
        assert [torch.nonzero(s).flatten().tolist() for s in src] == sources
        D = split.split_filter_k(w, arvs, rho)
        assert D.shape == (k + 1, c_in, 2, 3)
        residue = [i for i in range(c_in) if not any(i in s for s in sources)]
        for j in range(k):
            keep = sources[j] + residue
            for i in range(c_in):
                assert torch.equal(D[j, i], w[i] if i in keep else torch.zeros_like(w[i]))
        for i in range(c_in):
            assert torch.equal(D[k, i], w[i] if i in residue else torch.zeros_like(w[i]))
        assert torch.allclose(D[:k].sum(dim=0) - (k - 1) * D[k], w, rtol=1e-6, atol=1e-6)  # k w - (k-1) w: rounding
    f = split.split_filters_k(w, arvs)
    assert f.shape == (20, k + 1, c_in, 2, 3)
    assert all(torch.equal(f[r], split.split_filter_k(w, arvs, rho)) for r, rho in enumerate(RHOS))


def test_k2_split_is_the_published_rule_bit_for_bit():
    """The k-way functions with k = 2 give the published D1, D2, R to the bit (signed zeros included)."""
    torch.manual_seed(1)
    w = torch.randn(40, 3, 3)
    v1, v2 = torch.randn(40), torch.randn(40)
    v2[:5] = v1[:5]  # ties
    for rho in RHOS:
        src1 = rho * v1 > v2  # the published rule, written out
        src2 = ~src1 & (rho * v2 > v1)
        keep1 = (~src2).to(w.dtype)[:, None, None]
        keep2 = (~src1).to(w.dtype)[:, None, None]
        published = torch.stack([w * keep1, w * keep2, w * keep1 * keep2])
        got = split.split_filter_k(w, torch.stack([v1, v2]), rho)
        assert _bytes(got) == _bytes(published)
        assert _bytes(split.split_filter(w, v1, v2, rho)) == _bytes(published)


@pytest.mark.parametrize("k", [3, 4])
def test_checkpoint_layout_and_merge(k):
    torch.manual_seed(2)
    w = torch.randn(7, 1, 1)
    arvs = torch.randn(k, 7)
    D = split.split_filter_k(w, arvs, 0.5)
    sd = split.checkpoint_state_dict(D, torch.tensor(0.25))
    assert list(sd) == ["disentangled.weight", "disentangled.bias", "merged.weight"]
    assert sd["disentangled.weight"].shape == (k + 1, 7, 1, 1)
    assert sd["disentangled.bias"].tolist() == [0.25] * (k + 1)
    assert sd["merged.weight"].shape == (1, k + 1, 1, 1)
    assert sd["merged.weight"].flatten().tolist() == [1.0] * k + [-(k - 1.0)]
    m = sd["merged.weight"].flatten()
    assert torch.allclose((m[:, None, None, None] * D).sum(dim=0), w, atol=1e-6)
    assert float((m * sd["disentangled.bias"]).sum()) == 0.25
    assert disentangle.concepts_of_checkpoint(sd) == k
    assert split.checkpoint_state_dict(D[:3])["merged.weight"].flatten().tolist() == [1.0, 1.0, -1.0]


def test_names():
    assert names.class_checkpoint("m", 5, [[0], [1]], 0.5) == Triple(5, [0], [1]).checkpoint("m", 0.5) \
        == "m_channel5_classes1[0]_classes2[1]_f0.5_unnormalized.pth"
    assert names.class_checkpoint("m", 5, [[0], [1], [2, 3]], "best") == \
        "m_channel5_classes1[0]_classes2[1]_classes3[2, 3]_f_best_unnormalized.pth"
    assert Triple(5, [0], [1], more=[[2]]).checkpoint("m", 1.0) == \
        "m_channel5_classes1[0]_classes2[1]_classes3[2]_f1.0_unnormalized.pth"
    assert names.cluster_checkpoint("m", 5, 100, [0, 1, 2], 0.05) == \
        "m_channel5_top100_clusters0-1-2_f0.05_unnormalized.pth"


# ---------------------------------------------------------------------------- the k-way network

CASES = {
    "tiny_resnet_conv3_bn_after": (lambda: _frozen(tiny_resnet()), "conv3", 5, (8, 3, 64, 64)),
    "tiny_vgg_features.6_bias_3x3": (lambda: _frozen(tiny_vgg()), "features.6", 3, (8, 3, 209, 209)),
}


def _arvs(model, conv, images, groups, c):
    """Closed-form ARVs of channel c over each group of image positions: (k, C_in) float32."""
    P = attribution.conv_patch_sums(tap.layer_input(model, conv, images), conv)
    w_c = conv.weight[c].detach()
    return torch.stack([similarities.arv(w_c, similarities.rows_mean_patch_sums(P.numpy(), g)).float()
                        for g in groups])


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_kway_network_logits_equal_the_original(case, k):
    make, path, c, shape = CASES[case]
    model = make()
    conv = model.get_submodule(path)
    torch.manual_seed(4)
    images = torch.randn(shape)
    arvs = _arvs(model, conv, images, [list(range(j, shape[0], k)) for j in range(k)], c)
    r = max(range(20), key=lambda r: int(split.split_sources_k(arvs, RHOS[r]).any(dim=1).sum()))
    bias_c = None if conv.bias is None else conv.bias[c].detach()
    sd = split.checkpoint_state_dict(split.split_filters_k(conv.weight[c].detach(), arvs)[r], bias_c)
    assert disentangle.checkpoint_problem(sd, conv) is None
    dm = disentangle.disentangled_model(model, path, c, sd)
    diff, zmax = max_logit_difference(model, dm, images)
    assert diff <= 1e-4 * max(1.0, zmax)
    lp, merge = dm.get_submodule(path)
    c_out = conv.out_channels
    D = sd["disentangled.weight"]
    assert lp.out_channels == c_out + k and merge.in_channels == c_out + k
    assert torch.equal(lp.weight[c], D[0])
    for j in range(1, k + 1):  # rows C_out .. C_out+k-2 = D2 .. Dk, row C_out+k-1 = R
        assert torch.equal(lp.weight[c_out + j - 1], D[j])
    expect = torch.eye(c_out, c_out + k)
    expect[c, c_out:] = torch.tensor([1.0] * (k - 1) + [-(k - 1.0)])
    assert torch.equal(merge.weight[:, :, 0, 0], expect)
    with disentangle.disentangled_layer(model, path, c, sd) as same:
        assert split.within_tolerance(*max_logit_difference(_frozen(make()), same, images))
    assert model.get_submodule(path) is conv


def test_load_disentangled_model_reads_k_from_the_checkpoint(tmp_path):
    model = _frozen(tiny_resnet())
    torch.manual_seed(5)
    sd = split.checkpoint_state_dict(split.split_filter_k(model.conv3.weight[2].detach(),
                                                                      torch.randn(3, 24), 0.5))
    net = disentangle.load_disentangled_model(TINY, "none", "conv3", 2, sd)
    assert net.conv3[0].out_channels == 16 + 3
    images = torch.randn(2, 3, 64, 64)
    assert split.within_tolerance(*max_logit_difference(model, net, images))
    from utils.errors import UserError
    bad = dict(sd, **{"merged.weight": torch.ones(1, 3, 1, 1)})
    with pytest.raises(UserError, match="merged.weight"):
        disentangle.load_disentangled_model(TINY, "none", "conv3", 2, bad)


# ---------------------------------------------------------------------------- best rho, one pass

def _reference_kway(model, path, c, filters, bias_c, images, ids, k):
    """score(rho) one rho at a time from the full k-way network (maps of L' read by a hook)."""
    c_out = model.get_submodule(path).out_channels
    scores = []
    for r in range(len(RHOS)):
        dm = disentangle.disentangled_model(model, path, c, split.checkpoint_state_dict(filters[r], bias_c))
        keep = {}
        h = dm.get_submodule(path)[0].register_forward_hook(lambda m, i, o: keep.__setitem__("o", o))
        with torch.no_grad():
            dm(images)
        h.remove()
        o = keep["o"].double()
        rows = [c] + [c_out + j for j in range(k - 1)]
        pos = torch.stack([o[:, row].clamp_min(0).sum(dim=(1, 2)) for row in rows], dim=1)  # (N, k)
        total = 0.0
        for j in range(k):
            q = [float(pos[n, j] / (max(float(pos[n, m]) for m in range(k) if m != j) + 1e-5))
                 for n in range(len(images)) if ids[n] == j + 1]
            total += sum(q) / len(q)
        scores.append(total)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("case", ["tiny_resnet_conv3_bn_after"])
def test_kway_single_pass_scores_equal_a_per_rho_loop(case):
    make, path, c, shape = CASES[case]
    model = make()
    conv = model.get_submodule(path)
    torch.manual_seed(6)
    images = torch.randn((10,) + shape[1:])
    labels = torch.tensor([0, 1, 2, 1, 0, 3, 2, 1, 0, 4])  # class 4 in no concept
    classes = [[0], [1, 3], [2]]
    ids = rho_scores.concept_ids(labels, classes).tolist()
    assert ids == [1, 2, 3, 2, 1, 2, 3, 2, 1, 0]
    arvs = _arvs(model, conv, images, [[n for n in range(10) if ids[n] == j] for j in (1, 2, 3)], c)
    filters = split.split_filters_k(conv.weight[c].detach(), arvs)
    bias_c = None if conv.bias is None else conv.bias[c].detach()
    batches = scan_batches(model, conv, images, [4])
    rows = [[n for n in range(10) if ids[n] == j] for j in (1, 2, 3)]
    res = rho_scores.score_splits(conv, [rho_scores.Split(c, filters, bias_c, rows)], batches, "cpu")[0]
    ref = _reference_kway(model, path, c, filters, bias_c, images, ids, 3)
    torch.testing.assert_close(res.scores, ref, rtol=1e-5, atol=1e-6)
    assert res.images == [3, 4, 2] and res.pos.shape == (9, 20, 4) and sorted(res.concept.tolist()) == sorted(
        i for i in ids if i)
    torch.testing.assert_close(published_scores(res.pos, res.concept), res.scores, rtol=1e-9, atol=0)
    assert split.within_tolerance(res.max_map_diff, res.max_abs_map)
    # the rows of a concept in any order: the same numbers
    shuffled = rho_scores.score_splits(conv, [rho_scores.Split(c, filters, bias_c, [r[::-1] for r in rows])],
                                       batches, "cpu")[0]
    assert torch.equal(shuffled.scores, res.scores) and torch.equal(shuffled.pos, res.pos)
    # k = 2: the published score (as test_disentangle's reference) from the same pass
    f2 = split.split_filters_k(conv.weight[c].detach(), arvs[:2])
    two = rho_scores.score_splits(conv, [rho_scores.Split(c, f2, bias_c, rows[:2])], batches, "cpu")[0]
    ref2 = _reference_kway(model, path, c, f2, bias_c, images, [i if i < 3 else 0 for i in ids], 2)
    torch.testing.assert_close(two.scores, ref2, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the robust score

def _masses():
    """k = 2, three rhos, four images (two per concept); masses [D1, D2, R]."""
    pos = torch.tensor([
        # rho0: both maps alive           rho1: D2 dead everywhere       rho2: D2 dead on one concept-2 image
        [[3.0, 1.0, 9.0], [5.0, 0.0, 9.0], [2.0, 2.0, 9.0]],   # concept 1
        [[1.0, 1.0, 9.0], [4.0, 0.0, 9.0], [2.0, 0.0, 9.0]],   # concept 1
        [[1.0, 3.0, 9.0], [3.0, 0.0, 9.0], [1.0, 1.0, 9.0]],   # concept 2
        [[0.0, 2.0, 9.0], [1.0, 0.0, 9.0], [1.0, 0.0, 9.0]],   # concept 2
    ])
    return pos, torch.tensor([1, 1, 2, 2])


def test_robust_score_by_hand():
    pos, concept = _masses()
    # shares pos(D_own) / (pos(D1) + pos(D2)): rho0: .75, .5 | .75, 1;  rho1: 1, 1 | 0, 0;  rho2: .5, 1 | .5, 0
    torch.testing.assert_close(rho_scores.own_share(pos, concept), torch.tensor(
        [[0.75, 1.0, 0.5], [0.5, 1.0, 1.0], [0.75, 0.0, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64))
    dead = rho_scores.dead_shares(pos, concept)
    assert dead.tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.5]]
    assert rho_scores.degenerate(dead).tolist() == [False, True, False]  # 0.5 is not "more than half"
    robust = rho_scores.robust_scores(pos, concept)
    expect = [(0.625 * 0.875) ** 0.5, 0.0 - 1.0, (0.75 * 0.25) ** 0.5]
    torch.testing.assert_close(robust, torch.tensor(expect, dtype=torch.float64))
    published = published_scores(pos, concept)
    assert rho_scores.best_rho_index(published) == 1  # pos(D2) = 0 makes the published ratio ~1e5
    assert rho_scores.best_rho_index(robust) == 0


def test_a_rho_that_kills_a_map_never_wins():
    gen = torch.Generator().manual_seed(7)
    for trial in range(200):
        k = 2 + trial % 3
        n, nr = 12, 20
        concept = torch.arange(n) % k + 1
        pos = torch.rand((n, nr, k + 1), generator=gen) * 2
        pos[torch.rand(pos.shape, generator=gen) < 0.2] = 0.0
        killed = torch.randperm(nr, generator=gen)[:5]
        for r in killed.tolist():  # one concept's own map dead on all of its images
            j = int(torch.randint(k, (1,), generator=gen))
            pos[concept == j + 1, r, j] = 0.0
            pos[concept != j + 1, r, j] *= 50  # and large elsewhere: the published score may love it
        robust = rho_scores.robust_scores(pos, concept)
        deg = rho_scores.degenerate(rho_scores.dead_shares(pos, concept))
        assert ((robust >= -1) & (robust <= 1)).all()
        best = rho_scores.best_rho_index(robust)
        assert best not in killed.tolist()
        if not deg.all():
            assert not deg[best]
            assert (robust[deg] < 0).all() and (robust[~deg] > 0).all()


def test_k3_robust_prefers_a_lower_share_over_a_dead_map():
    concept = torch.tensor([1, 2, 3, 3, 3])
    pos = torch.zeros(5, 2, 4)
    # rho0: every image's own map holds 60 % of the mass; rho1: 100 %, but D3 is dead on 2 of 3 concept-3 images
    for n, j in enumerate(concept.tolist()):
        pos[n, 0] = 0.2
        pos[n, 0, j - 1] = 0.6
        pos[n, 1, j - 1] = 1.0
    pos[3, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    pos[4, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    robust = rho_scores.robust_scores(pos, concept)
    torch.testing.assert_close(robust[0], torch.tensor(0.6, dtype=torch.float64))
    torch.testing.assert_close(robust[1], torch.tensor((1.0 * 1.0 * (1 / 3)) ** (1 / 3) - 1, dtype=torch.float64))
    assert rho_scores.best_rho_index(robust) == 0


# ---------------------------------------------------------------------------- the degeneracy warning

@pytest.mark.parametrize("dead_images,warned", [(0, False), (2, False), (3, True)])
def test_degeneracy_warning_exactly_when_the_rule_says(dead_images, warned):
    """D2 is dead on 0, 2 (half: not degenerate) or 3 (degenerate) of concept 2's 4 images at rho1, which the
    published score picks in each case (D2 dead on concept 1's images gives ratios of 1e5)."""
    pos = torch.ones(8, 20, 3)
    concept = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])
    pos[:4, 1, 1] = 0.0
    pos[4:4 + dead_images, 1, 1] = 0.0
    res = rho_scores.SplitScores(published_scores(pos, concept), [4, 4], 0.0, 1.0, pos, concept)
    ch = rho_scores.choose(res, "published")
    assert ch["published_best"] == 1
    dead2 = float(res.dead()[1, 1])
    assert dead2 == dead_images / 4
    assert ch["degenerate"] is (dead2 > 0.5) is warned
    run = dict(ch, logit_images=4, logit_diff=0.0, logit_max=1.0, maps_ok=True, logits_ok=True)
    job = SimpleNamespace(concepts=Triple(0, [0], [1]), counts=[4, 4], res=res, run=run,
                          arvs=[torch.ones(3), torch.zeros(3)])
    text = stage3_text.job_lines("conv3", ["a", "b"], job)
    lines = [ln for ln in text if "warning" in ln]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert lines[0].startswith("warning: the published choice rho = 0.1 is degenerate: concept 2's own map D2")
        assert "75% of its 4 images" in lines[0] and f"robust choice: rho = {RHOS[ch['robust_best']]}" in lines[0]
    assert any(ln.startswith("rho choices: published rho = 0.1") for ln in text)


# ---------------------------------------------------------------------------- the command lines

def ok(script, *args, cwd=None):
    proc = run_inproc(script, *args, cwd=cwd)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def concepts_file(path, store_dir, channel, groups, fingerprint_change=None):
    """A concepts file (schema of utils.concepts) for ``channel`` of the tiny store whose clusters are the given
    groups of store rows; centroids and mean ARVs from the store's patch sums."""
    folder = store.store_folder(store_dir, TAG)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    P = np.load(os.path.join(folder, "patch_sums.npy"))
    y = np.load(os.path.join(folder, "targets.npy"))
    r = similarities.arv(tiny_resnet().conv3.weight[channel].detach(), torch.from_numpy(P))
    clusters = [{"rows": list(map(int, g)), "size": len(g), "centroid": clustering.l1_normalize(r[g]).mean(0).tolist(),
                 "mean_arv": r[g].mean(0).tolist(), "classes": {},
                 "class_counts": [[int(c), int((y[g] == c).sum())] for c in np.unique(y[g])]} for g in groups]
    fp = {k: manifest[k] for k in store.MATCH_KEYS}
    fp.update(fingerprint_change or {})
    doc = {"fingerprint": fp, "top_n": 24, "k": len(groups),
           "channels": {str(channel): {"channel": channel, "k": len(groups), "silhouette": 0.5,
                                       "silhouette_by_k": {}, "sign": 1, "top_rows": list(range(24)),
                                       "clusters": clusters}}}
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture(scope="module")
def case(image_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("kway")
    store_dir = str(root / "store")
    ok("get_importances_for_classes.py", "--data_dir", image_root, "--store_dir", store_dir, *MODEL)
    return SimpleNamespace(root=root, data=image_root, store=store_dir)


# the k = 2 byte-identity test: stage 1 (this tree's: its store is the input of both sides) into WORK/store, then
# stages 3 and 4 with two concepts; tests/make_digests.py runs the same calls with BEFORE_KWAY's stages 3 and 4
K2_FLAGS = ["--channel_disentangle", 7, "--classes_for_concept1", 0, 2, "--classes_for_concept2", 1]
INFO_NAME = f"{TAG}_channel7_classes1[0, 2]_classes2[1]_info.json"


def k2_calls(work, today=True):
    """(stage-1 call, [stage-3 call, stage-4 call]) of the k = 2 case in ``work``, whose data folder it writes
    (``make_image_folder``'s defaults, as the image_root fixture). ``today``: stage 3 gets --no_channels_last, which
    today's code needs to score as the older code did (channels-last rounds otherwise); the older code lacks it."""
    data, store = os.path.join(work, "data"), os.path.join(work, "store")
    make_image_folder(data)
    model = [*MODEL, "--cpu_threads", digests.THREADS]
    s3 = ["--data_dir", data, "--store_dir", store, *MODEL, *K2_FLAGS] + (["--no_channels_last"] if today else [])
    s4 = ["--data_dir", data, "--model_dir", store, *MODEL, "--layer_of_interest", "conv3", "--channel_of_interest", 7,
          "--classes_for_concept1", 0, 2, "--classes_for_concept2", 1, "--get_qualitative", "--get_quantitative",
          "--get_top_images", "--proportion_attribution_required", 0.0, "--out_dir", os.path.join(work, "out")]
    return (("get_importances_for_classes.py", ["--data_dir", data, "--store_dir", store, *model]),
            [("disentangle_channel.py", s3), ("get_results.py", s4)])


@pytest.fixture
def digest_threads():
    """digests.THREADS torch threads for this test's in-process runs (CPU convolutions round by the count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(digests.THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_k2_files_are_byte_identical_to_the_code_before_kway(tmp_path, digest_threads):
    """Stage 3 and stage 4 with two concepts: every file of the code before k-way, byte for byte (the info file
    gains keys after the published ones, which keep their values and order), with --no_channels_last; the older
    code's side is its checked-in digests (tests/digests/a34598c.json, ``python -m tests.make_digests a34598c``)."""
    old = digests.load(BEFORE_KWAY)["runs"]["k2"]
    work = str(tmp_path)
    stage1, (stage3, stage4) = k2_calls(work)
    ok(stage1[0], *stage1[1])
    new3 = ok(stage3[0], *stage3[1])
    models = os.path.join(work, "store", "models_disentangled")
    old_info = old["models_disentangled"].pop(INFO_NAME)
    assert len(old["models_disentangled"]) == 22
    assert digests.differing_files(models, old["models_disentangled"], work, skip=(INFO_NAME,)) == []
    new_info = json.load(open(os.path.join(models, INFO_NAME)))
    assert list(new_info)[:len(old_info["key_order"])] == old_info["key_order"]
    published = json.dumps({k: new_info[k] for k in old_info["key_order"]}, indent=1) + "\n"
    assert digests.sha256(published.replace(work, "<root>")) == old_info["sha256"]
    assert new_info["rho_score"] == "published" and new_info["best_rho_published"] == new_info["best_rho"]
    assert new_info["published_choice_degenerate"] == any(d > 0.5 for d in new_info["dead_share_published"])
    assert len(new_info["robust_scores"]) == 20 and all(-1 <= s <= 1 for s in new_info["robust_scores"])
    assert "rho choices: published rho" in new3.stdout
    ok(stage4[0], *stage4[1])
    out = os.path.join(work, "out")
    assert len(old["out"]) > 5 and digests.differing_files(out, old["out"], work, skip=(".lock",)) == []
    assert len(open(os.path.join(out, "results_quantitative", "quantitative_concept1_required0.0.txt"))
               .read().splitlines()) == 8  # every val image of classes 0 and 2


@pytest.mark.slow
def test_three_concepts_by_classes_and_by_a_concepts_file(case, tmp_path):
    """k = 3 through both stages: checkpoints of the published pattern, exact, stage 4 with 4 maps; and the
    same three concepts given as clusters of a concepts file give the same split."""
    store_dir = str(tmp_path / "store")
    shutil.copytree(store.store_folder(case.store, TAG), store.store_folder(store_dir, TAG))
    s3 = ok("disentangle_channel.py", "--data_dir", case.data, "--store_dir", store_dir, *MODEL, "--channel_disentangle",
            5, "--classes_for_concept1", 0, "--classes_for_concept2", 1, "--classes_for_concept3", "2,3",
            "--rho_score", "robust")
    assert "OK, same function" in s3.stdout and "D1 + D2 + D3 - 2 R" in s3.stdout
    base = os.path.join(store_dir, "models_disentangled", f"{TAG}_channel5_classes1[0]_classes2[1]_classes3[2, 3]")
    info = json.load(open(base + "_info.json"))
    assert info["classes3"] == [2, 3] and info["train_images_concept3"] == 12 and info["map_check_images"] == 24
    assert info["rho_score"] == "robust" and info["best_rho"] == info["best_rho_robust"]
    assert info["best_rho_robust"] == RHOS[rho_scores.best_rho_index(info["robust_scores"])]
    sd = torch.load(base + "_f_best_unnormalized.pth", weights_only=True)
    assert sd["disentangled.weight"].shape == (4, 24, 1, 1) and sd["merged.weight"].flatten().tolist() == [1, 1, 1, -2]
    W = tiny_resnet().conv3.weight[5].detach()
    D = sd["disentangled.weight"]
    assert torch.allclose(D[:3].sum(0) - 2 * D[3], W, atol=1e-6)
    out = tmp_path / "out"
    s4 = ok("get_results.py", "--data_dir", case.data, "--model_dir", store_dir, *MODEL, "--layer_of_interest", "conv3",
            "--channel_of_interest", 5, "--classes_for_concept1", 0, "--classes_for_concept2", 1,
            "--classes_for_concept3", 2, 3, "--get_qualitative", "--get_quantitative", "--get_top_images",
            "--proportion_attribution_required", 0.0, "--out_dir", out, "--get_feature_vis", "--fv_size", 24,
            "--fv_steps", 2, "--fv_crops", 2, "--fv_spectrum_images", 8)
    summary = json.load(open(out / "results_disentanglement" /
                             f"{TAG}_channel5_classes1[0]_classes2[1]_classes3[2, 3]_f_best_unnormalized_summary.json"))
    assert [summary[f"val_images_concept{j}"] for j in (1, 2, 3)] == [4, 4, 8]
    assert list(summary["mean_pos_concept3"]) == ["original", "D1", "D2", "D3", "R"]
    assert list(summary["quantitative_concept2"]) == ["images", "D1/orig", "D2/orig", "D3/orig", "R/orig"]
    rows = open(out / "results_quantitative" / "quantitative_k3_concept3_required0.0.txt").read().splitlines()
    assert len(rows) == 8 and all(len(r.split(",")) == 4 for r in rows)
    dens = open(out / "results_disentanglement" / "density_concept3.txt").read()
    assert dens.count("\\begin{filecontents*}") == 4 and "disentangled3_c3.dat" in dens
    assert list(summary["top_images"]) == ["Original", "Disentangled 1", "Disentangled 2", "Disentangled 3"]
    assert not os.path.exists(out / "results_quantitative" / "quantitative_concept1_required0.0.txt")
    fv = json.load(open(out / "results_disentanglement" /
                        f"{TAG}_channel5_classes1[0]_classes2[1]_classes3[2, 3]_f_best_unnormalized_feature_vis.json"))
    assert fv["targets"] == ["original", "D1", "D2", "D3"] and fv["classes3"] == [2, 3]
    assert fv["titles"] == ["Original", "Disentangled 1", "Disentangled 2", "Disentangled 3"]
    assert np.load(out / "results_disentanglement" / fv["images"]).shape == (4, 3, 24, 24)
    assert {t["concept"] for t in fv["top_images"]["D3"]} <= {1, 2, 3} and "Disentangled 3" in s4.stdout

    # the same concepts as clusters: same ARVs, same filters, same scores
    y = np.load(os.path.join(store.store_folder(store_dir, TAG), "targets.npy"))
    groups = [np.flatnonzero(y == 0), np.flatnonzero(y == 1), np.flatnonzero(y >= 2)]
    cfile = concepts_file(tmp_path / "concepts.json", store_dir, 5, groups)
    s3c = ok("disentangle_channel.py", "--data_dir", case.data, "--store_dir", store_dir, *MODEL,
             "--channel_disentangle", 5, "--concepts_file", cfile, "--rho_score", "robust")
    assert "concept 3 = cluster 2 (class2 x6, class3 x6)" in s3c.stdout
    cbase = os.path.join(store_dir, "models_disentangled", f"{TAG}_channel5_top24_clusters0-1-2")
    cinfo = json.load(open(cbase + "_info.json"))
    assert cinfo["clusters"] == [0, 1, 2] and cinfo["scores"] == info["scores"]
    assert cinfo["robust_scores"] == info["robust_scores"]
    assert torch.equal(torch.load(cbase + "_f_best_unnormalized.pth", weights_only=True)["disentangled.weight"], D)
    # stage 4 by clusters: val images by the nearest centroid among the top val images
    s4c = ok("get_results.py", "--data_dir", case.data, "--model_dir", store_dir, *MODEL, "--layer_of_interest",
             "conv3", "--channel_of_interest", 5, "--concepts_file", cfile, "--get_quantitative",
             "--proportion_attribution_required", 0.0, "--out_dir", tmp_path / "outc", "--get_feature_vis",
             "--fv_size", 24, "--fv_steps", 2, "--fv_crops", 2, "--fv_spectrum_images", 8)
    csum = json.load(open(tmp_path / "outc" / "results_disentanglement" /
                          f"{TAG}_channel5_top24_clusters0-1-2_f_best_unnormalized_summary.json"))
    assert csum["clusters"] == [0, 1, 2] and csum["val_top_n"] == 16
    assert sum(csum[f"val_images_concept{j}"] for j in (1, 2, 3)) == 16
    assert "top 16 of 16 val images" in s4c.stdout
    cfv = json.load(open(tmp_path / "outc" / "results_disentanglement" /
                         f"{TAG}_channel5_top24_clusters0-1-2_f_best_unnormalized_feature_vis.json"))
    assert [cfv[f"val_images_concept{j}"] for j in (1, 2, 3)] == [csum[f"val_images_concept{j}"] for j in (1, 2, 3)]
    assert cfv["targets"] == ["original", "D1", "D2", "D3"] and cfv["val_images"] == 16
    # stage 4 refuses another concepts file (same clusters, other bytes), another channel, another model's file
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(json.load(open(cfile)), k="auto")))
    wrong = tmp_path / "wrong_weights.json"
    concepts_file(wrong, store_dir, 5, groups, {"weights_sha256": "0" * 64})
    common = ["--data_dir", case.data, "--model_dir", store_dir, *MODEL, "--layer_of_interest", "conv3",
              "--get_quantitative", "--out_dir", tmp_path / "refused"]
    before = tree_bytes(store_dir)
    for extra, words in (([5, "--concepts_file", other], "another concepts file"),
                         ([6, "--concepts_file", cfile], "channel 6 is not in the file"),
                         ([5, "--concepts_file", wrong], "another store or model")):
        proc = run_inproc("get_results.py", *common, "--channel_of_interest", *extra)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert tree_bytes(store_dir) == before and not os.path.exists(tmp_path / "refused")


def test_val_concepts_of_clusters_by_hand():
    from utils.concepts.by_clusters import assign_val_concepts
    summed = np.array([5.0, 1.0, 4.0, 3.0, -9.0])
    arvs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.1], [0.0, -1.0]])
    cents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    # top 3 by summed: rows 0, 2, 3; nearest centroids 0, 1, 0; the split uses clusters [1, 0]
    assert assign_val_concepts(summed, arvs, 1, 3, cents, [1, 0]).tolist() == [2, 0, 1, 2, 0]
    # sign -1: the most negative first: row 4 (cluster 2, not used), row 1 (cluster 1)
    assert assign_val_concepts(summed, arvs, -1, 2, cents, [1, 0]).tolist() == [0, 1, 0, 0, 0]


BAD = {
    # name: (stage-3 flags, words of the one-line message)
    "overlapping_concepts": (["--classes_for_concept1", 0, "--classes_for_concept2", 1, "--classes_for_concept3", 1, 2],
                             ("class 1 is in both concepts", "--classes_for_concept2", "--classes_for_concept3")),
    "concept_gap": (["--classes_for_concept1", 0, "--classes_for_concept2", 1, "--classes_for_concept4", 2],
                    ("--classes_for_concept4 without --classes_for_concept3",)),
    "k1_classes": (["--classes_for_concept1", 0], ("--classes_for_concept2",)),
    "k1_clusters": (["--concepts_file", "GOOD", "--clusters", 1], ("1 concept(s)", "at least two")),
    "cluster_out_of_range": (["--concepts_file", "GOOD", "--clusters", 0, 3], ("--clusters 3", "0..2")),
    "other_store": (["--concepts_file", "OTHER"], ("another store", "weights")),
    "other_channel": (["--concepts_file", "GOOD", "--channel_disentangle", 6], ("channel 6 is not in the file",)),
    "file_and_classes": (["--concepts_file", "GOOD", "--classes_for_concept1", 0], ("drop --classes_for_concept1",)),
    "missing_file": (["--concepts_file", "NOFILE"], ("not found",)),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_refused_in_one_line_nothing_damaged(case, tmp_path, name):
    extra, words = BAD[name]
    y = np.load(os.path.join(store.store_folder(case.store, TAG), "targets.npy"))
    groups = [np.flatnonzero(y == 0), np.flatnonzero(y == 1), np.flatnonzero(y >= 2)]
    files = {"GOOD": concepts_file(tmp_path / "good.json", case.store, 5, groups),
             "OTHER": concepts_file(tmp_path / "other.json", case.store, 5, groups,
                                    {"weights_sha256": "0" * 64, "weights": "other.pth"}),
             "NOFILE": str(tmp_path / "none.json")}
    args = [files.get(a, a) if isinstance(a, str) else a for a in extra]
    if "--channel_disentangle" not in args:
        args = ["--channel_disentangle", 5, *args]
    before = tree_bytes(case.store)
    proc = run_inproc("disentangle_channel.py", "--data_dir", case.data, "--store_dir", case.store, *MODEL, *args)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert tree_bytes(case.store) == before
