"""The SAE view (issue 12): the TopK SAE, the channel's decomposition over its features, the purity
metrics of the benchmark, and stage 4's --get_sae_view on the hand-built colour net of test_featurevis."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.conftest import tree_bytes
from tests.test_cli import refuse, run_inproc
from tests.test_featurevis import TAG, _stage4_args, red_green_checkpoint
from benchmarks import purity_scores as purity
from utils.method import sae as S
from utils.files.names import class_checkpoint



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest on a shared machine; the count is given back after this module (set at
    import, it held for every test of the session, whose in-process runs then rounded otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SAE_SMALL = ["--get_sae_view", "--sae_steps", 30, "--sae_positions_per_image", 3, "--sae_batch_size", 64]


def _sparse_data(seed, n=2000, atoms=4, dim=16, active=2):
    """Vectors made of exactly ``active`` of ``atoms`` unit atoms with coefficients in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(atoms, dim, generator=g)
    a = a / a.norm(dim=1, keepdim=True)
    pick = torch.rand(n, atoms, generator=g).topk(active, dim=1).indices
    coef = torch.zeros(n, atoms).scatter(1, pick, 1.0) * (0.5 + torch.rand(n, atoms, generator=g))
    return coef @ a, a


# ----------------------------------------------------------------------------- the SAE
def test_exactly_k_features_are_active():
    g = torch.Generator().manual_seed(0)
    sae = S.TopKSAE(16, 128, 5, g)
    x = torch.randn(300, 16, generator=g)
    pre = sae.pre_activations(x)
    f = sae.encode(x)
    assert ((f != 0).sum(dim=1) == torch.clamp((pre > 0).sum(dim=1), max=5)).all()
    assert ((f != 0).sum(dim=1) == 5).float().mean() > 0.99  # random data: always 5 positive candidates
    kept = torch.gather(pre, 1, pre.topk(5, dim=1).indices)
    assert torch.equal(torch.sort(f, dim=1).values[:, -5:], torch.sort(kept, dim=1).values)
    with pytest.raises(ValueError):
        S.TopKSAE(4, 8, 9)


def test_decoder_columns_have_unit_norm_after_every_step():
    x, _ = _sparse_data(1, n=200)
    norms = []
    S.train_sae(x, 32, 3, 20, 64, 1e-2, 0, on_step=lambda s: norms.append(s.W_dec.detach().norm(dim=0)))
    assert len(norms) == 20
    for n in norms:
        torch.testing.assert_close(n, torch.ones_like(n), atol=1e-6, rtol=0)


def test_recovers_a_known_sparse_dictionary():
    x, atoms = _sparse_data(0)
    sae, losses = S.train_sae(x, 8, 2, 400, 256, 1e-2, 0)
    best = (atoms @ sae.W_dec.detach()).max(dim=1).values
    assert (best >= 0.9).all(), best
    assert losses[-1] < 0.05 < losses[0]
    assert S.fraction_of_variance_unexplained(x, sae(x)[0].detach()) < 0.05


def test_sampled_positions_prefer_large_norms():
    x = torch.zeros(200, 3, 2, 2)
    x[:, :, 0, 0] = 10.0  # one strong position, three weak ones
    x[:, :, 1, :] = 0.1
    x[:, :, 0, 1] = 0.1
    v = S.sample_positions(x, 1, torch.Generator().manual_seed(0))
    assert v.shape == (200, 3) and (v[:, 0] == 10).float().mean() > 0.9
    assert S.sample_positions(x, 9, torch.Generator()).shape == (800, 3)  # more than H W: every position once


# ----------------------------------------------------------------------------- the decomposition
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(1, 1, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2)])
def test_contributions_plus_constant_equal_the_channel_on_the_reconstruction(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(kernel + stride)
    conv = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding, dilation=dilation).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        conv.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    sae = S.TopKSAE(6, 24, 4, g).double()
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=g, dtype=torch.float64))  # a non-zero b_dec: the border matters
        sae.b_enc.add_(0.5)
    x = torch.randn(3, 6, 9, 8, generator=g, dtype=torch.float64)
    c = 2
    with torch.no_grad():
        f = S.feature_maps(sae, x)
        x_hat = S.reconstruction(sae, f)
        on_reconstruction = conv(x_hat)[:, c]
        contrib = S.channel_contributions(f, conv, conv.weight[c], sae.W_dec)
        const = S.constant_term(conv, conv.weight[c], conv.bias[c], sae.b_dec, x.shape[-2:])
    assert contrib.shape == (3, 24) + on_reconstruction.shape[-2:]
    torch.testing.assert_close(contrib.sum(dim=1) + const, on_reconstruction, atol=1e-5, rtol=0)
    # each contribution on its own: the channel's map of the feature's part of the reconstruction, W[c] . f_j d_j
    j = int(f.sum(dim=(0, 2, 3)).argmax())
    part = torch.einsum("nhw,k->nkhw", f[:, j], sae.W_dec[:, j].detach())
    alone = nn.functional.conv2d(part, conv.weight[c:c + 1], None, stride, padding, dilation)[:, 0]
    torch.testing.assert_close(contrib[:, j], alone.detach(), atol=1e-10, rtol=0)
    interior = (conv.weight[c] * sae.b_dec.detach()[:, None, None]).sum() + conv.bias[c]
    if padding:  # the constant term differs at the border, where taps fall on the zero padding
        assert not torch.allclose(const[0, 0], interior.detach())
        assert torch.isclose(const[const.shape[0] // 2, const.shape[1] // 2], interior.detach())
    else:
        torch.testing.assert_close(const, interior.detach().expand_as(const))


# ----------------------------------------------------------------------------- the metrics
def test_purity_and_share_on_a_hand_built_case():
    names = ["blue_dotted", "blue_solid", "red_dotted", "red_solid"]
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pos = np.array([6.0, 4, 0, 0, 5, 5, 0, 0])  # a unit of "dotted": blue_dotted 10, red_dotted 10
    r = purity.score_unit(pos, labels, names, 2, pos_channel=np.full(8, 5.0))
    assert r["purity"] == 0.5 and r["class"] == "blue_dotted"  # tie: the first class
    assert r["purity_texture"] == 1.0 and r["purity_colour"] == 0.5
    assert r["top_n_purity"] == 0.5  # the top 2: 6 (blue_dotted) and 5 (red_dotted, first of the ties)
    assert r["share"] == 0.5
    pos2 = np.array([1.0, 1, 0, 0, 0, 0, 0, 8])
    assert purity.activation_purity(pos2, labels) == (0.8, 3)
    assert purity.top_n_purity(pos2, labels, 3) == pytest.approx(2 / 3)
    assert np.isnan(purity.activation_purity(np.zeros(8), labels)[0])
    assert purity.share_of_channel([1, 2], [3, 3]) == 0.5


def test_virtual_neurons_split_the_channel_by_nearest_centroid():
    arvs = np.array([[2.0, 0, 0], [0, 3, 1], [1, 0, 0.1], [0, 1, 0]])
    centroids = np.array([[1.0, 0, 0], [0, 0.75, 0.25]])
    from utils.method.clustering import nearest_centroid
    member = nearest_centroid(torch.as_tensor(arvs), torch.as_tensor(centroids)).numpy()
    v = purity.virtual_neurons([4.0, 3, 2, 1], member, len(centroids))
    assert v.tolist() == [[4, 0, 2, 0], [0, 3, 0, 1]]
    assert v.sum(axis=0).tolist() == [4, 3, 2, 1]  # together: the channel


# ----------------------------------------------------------------------------- stage 4's --get_sae_view
@pytest.fixture(scope="module")
def sae_run(image_root, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("sae_store"))
    out = str(tmp_path_factory.mktemp("sae_out"))
    os.makedirs(os.path.join(store, "models_disentangled"))
    torch.save(red_green_checkpoint(), os.path.join(store, "models_disentangled",
                                                     class_checkpoint(TAG, 0, [[0], [1]], "best")))
    proc = run_inproc("get_results.py", *_stage4_args(image_root, store, out, *SAE_SMALL))
    assert proc.returncode == 0, proc.stderr
    return store, out, proc.stdout


def _view(out):
    run = class_checkpoint(TAG, 0, [[0], [1]], "best")[:-4]
    with open(os.path.join(out, "results_disentanglement", f"{run}_sae_view.json")) as f:
        return run, json.load(f)


def test_stage4_sae_view_writes_figure_and_json(sae_run):
    store, out, stdout = sae_run
    run, rec = _view(out)
    assert rec["dictionary"] == 16 and rec["k"] == 8 and rec["sae_reused"] is False
    assert rec["training"]["vectors"] == 4 * 6 * 3  # 4 classes x 6 training images x 3 positions
    assert rec["fvu"] > 0 and rec["dead_features"] == len(rec["dead_feature_ids"])
    assert all(0 <= j < 16 for j in rec["dead_feature_ids"]) and not set(rec["dead_feature_ids"]) & {
        ft["feature"] for ft in rec["features"]}  # a listed feature contributes, so it fires
    assert rec["decomposition_max_error"] < 1e-4
    assert 1 <= len(rec["features"]) <= 8
    means = [ft["mean_pos_contribution"] for ft in rec["features"]]
    assert means == sorted(means, reverse=True) and means[-1] > 0
    assert all(0 < ft["share"] for ft in rec["features"])
    assert os.path.isfile(os.path.join(out, "plots", f"sae_view_{run}.png"))
    assert os.path.isfile(rec["sae"]) and "SAE view" in stdout


def test_stage4_sae_view_reuses_the_sae_with_the_same_settings_only(sae_run, image_root):
    store, out, _ = sae_run
    _, first = _view(out)
    proc = run_inproc("get_results.py", *_stage4_args(image_root, store, out + "_again", *SAE_SMALL))
    assert proc.returncode == 0, proc.stderr
    _, again = _view(out + "_again")
    assert again["sae_reused"] is True and again["sae"] == first["sae"] and again["features"] == first["features"]
    proc = run_inproc("get_results.py", *_stage4_args(image_root, store, out + "_seed1", *SAE_SMALL, "--sae_seed", 1,
                                                      "--sae_train_images", 8))
    assert proc.returncode == 0, proc.stderr
    _, other = _view(out + "_seed1")
    assert other["sae_reused"] is False and other["sae"] != first["sae"]
    assert other["training"]["train_images"] == 8 and other["training"]["vectors"] == 8 * 3


@pytest.mark.parametrize("extra,words", [(["--sae_k", 17], ("--sae_k", "16")),
                                         (["--sae_positions_per_image", 0], ("--sae_positions_per_image",)),
                                         (["--sae_expansion", 0], ("--sae_expansion",))])
def test_bad_sae_flags_are_refused_and_nothing_is_damaged(sae_run, image_root, extra, words):
    store, out, _ = sae_run
    before, saes = tree_bytes(out), sorted(os.listdir(os.path.join(store, "sae")))
    refuse("get_results.py", *_stage4_args(image_root, store, out, *SAE_SMALL, *extra), words=words)
    assert tree_bytes(out) == before and sorted(os.listdir(os.path.join(store, "sae"))) == saes


def test_an_sae_of_another_data_set_or_setting_is_never_reused(image_root, tmp_path):
    from types import SimpleNamespace
    from tests.conftest import make_image_folder
    from utils.data import folders
    from utils.stages import sae_view
    other = make_image_folder(str(tmp_path / "other"), seed=5)  # the same class folders and file names, other pixels
    ctx = SimpleNamespace(model_spec="m", weights_sha256="w", layer_path="conv_out", conv=nn.Conv2d(2, 2, 1))
    settings = dict(sae_view.DEFAULTS, batch_size=64)
    key = lambda root, st: sae_view.record_of(ctx, folders.image_folder(root, "train"), st)[1]
    assert key(image_root, settings) == key(image_root, dict(settings))
    assert key(other, settings) != key(image_root, settings)
    assert key(image_root, dict(settings, sae_k=4)) != key(image_root, settings)
    assert key(image_root, dict(settings, batch_size=32)) != key(image_root, settings)


def test_every_sae_flag_reaches_the_record_of_what_made_the_sae():
    """Each --sae_* flag and --batch_size change the SAE's record when they leave their default (a setting
    missing from the record would let another setting's SAE be reused); the record keeps the file's order; a
    k larger than the dictionary is refused."""
    import get_results
    from tests.test_featurevis import other_value, spec_of
    from utils.run import settings_of_flags
    from utils.stages import sae_view

    def settings_of(args):
        return settings_of_flags.sae_view(args, spec_of(args))
    parser = get_results.build_parser()
    base = settings_of(parser.parse_args([])).record()
    assert list(base) == list(sae_view.DEFAULTS) + ["batch_size"]  # the record's keys, in the file's order
    flags = [a for a in parser._actions if a.dest.startswith("sae_")]
    assert sorted(a.dest for a in flags) == sorted(sae_view.DEFAULTS)
    runs = [[a.option_strings[0], other_value(a)] for a in flags] + [["--batch_size", "11"]]
    assert [r[0] for r in runs if settings_of(parser.parse_args(r)).record() == base] == []
    sae_view.check(sae_view.Settings(sae_expansion=1, sae_k=2), nn.Conv2d(2, 4, 1))  # k = m: fine
    with pytest.raises(Exception, match="--sae_k 3 is larger than the dictionary: m = --sae_expansion 1 x 2"):
        sae_view.check(sae_view.Settings(sae_expansion=1, sae_k=3), nn.Conv2d(2, 4, 1))
