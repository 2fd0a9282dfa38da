"""Stage 2's --importance_sign: the summed activation after the BatchNorm that follows the layer, computed
from the store's patch sums and the BatchNorm's parameters, against a model pass with hooks; the histograms
it gives; and the published rule's files byte for byte with and without the flag."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests import tiny_models
from tests.conftest import run_stage, tree_bytes
from tests.test_cli import run_inproc
from utils.model import tap
from utils.method import attribution
from utils.model import loading
from utils.method import similarities
from utils.method.similarities import SummedLayer
from utils.stages import stage2_passes

TINY = "tests.tiny_models:tiny_resnet"
TINY_TAG = "tests_tiny_models_tiny_resnet"
RUNTIME = ["--num_workers", "0", "--device", "cpu"]
TAU, P = 0.03, 0.5


def hooked_sums(model, conv, bn, images):
    """Per image and channel: sum over positions of the conv's output and of the BatchNorm's output, from hooks."""
    seen = {}
    hooks = [conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.detach().sum(dim=(2, 3))))]
    if bn is not None:
        hooks.append(bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.detach().sum(dim=(2, 3)))))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen["conv"].double(), seen.get("bn", seen["conv"]).double()


def from_store_math(model, conv, bn, images):
    """The same sums from the patch sums (what stage 1 stores) and the BatchNorm's affine map only."""
    x, a = tap.layer_input_output(model, conv, images)
    P = attribution.conv_patch_sums(x, conv)  # (N, C_in, kh, kw) float32, as in the store
    positions = a.shape[2] * a.shape[3]
    s = similarities.summed_activation(P, conv.weight, conv.bias, positions)
    after = s if bn is None else similarities.affine_summed(s, *loading.batchnorm_affine(bn), positions)
    return s, after


def check_signs(got, want):
    scale = want.abs().max()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(scale))
    clear = want.abs() > 1e-4 * scale  # values at rounding distance from 0 may take either sign
    assert clear.float().mean() > 0.9
    assert torch.equal(got[clear] > 0, want[clear] > 0)
    return clear


def test_post_batchnorm_sign_from_the_store_equals_hooks():
    """tiny_resnet's conv3 -> bn3: both signs occur after the BatchNorm, and the store's math gives them."""
    model = tiny_models.tiny_resnet()
    images = torch.randn(12, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    bn = loading.batchnorm_after(model, model.conv3, images[:1])
    assert bn is model.bn3
    want_conv, want_bn = hooked_sums(model, model.conv3, bn, images)
    got_conv, got_bn = from_store_math(model, model.conv3, bn, images)
    check_signs(got_conv, want_conv)
    clear = check_signs(got_bn, want_bn)
    assert (want_bn[clear] > 0).any() and (want_bn[clear] < 0).any()
    # the BatchNorm flips some signs: the layer's own sign is not the same rule
    assert not torch.equal(got_conv > 0, got_bn > 0)


def test_post_batchnorm_sign_with_bias_padding_and_stride():
    """A 3x3 conv with a bias, padding 1 and stride 2 before a BatchNorm with a negative weight: the bias
    counts once per output position, padded positions are zeros in the patch sums."""
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(6)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tiny_models._randomize_bn(net, 2)
    with torch.no_grad():
        bn.weight[0] = -1.0
        conv.bias.mul_(5)
    net.eval()
    images = torch.randn(10, 3, 17, 15, generator=torch.Generator().manual_seed(3))
    assert loading.batchnorm_after(net, conv, images[:1]) is bn
    want_conv, want_bn = hooked_sums(net, conv, bn, images)
    got_conv, got_bn = from_store_math(net, conv, bn, images)
    check_signs(got_conv, want_conv)
    check_signs(got_bn, want_bn)


def test_sign_histograms_by_hand():
    """Two classes, two channels, hand-made attributions and summed activations (1x1 conv, one position)."""
    A = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float16)
    targets = np.array([0, 0, 1, 1, -1])  # the last row: an unreadable image, never counted
    # the layer's summed activation is the patch sum itself (W = identity, no bias, one position)
    S = np.array([[2.0, -1.0], [-3.0, 4.0], [1.0, 1.0], [-1.0, -2.0], [5.0, 5.0]], dtype=np.float32)
    W = torch.eye(2).view(2, 2, 1, 1)
    scale, shift = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5])  # channel 1: BN(a) = -a + 0.5
    h = stage2_passes.sign_histograms(A, targets, S.reshape(5, 2, 1, 1), 2, 0.1, SummedLayer(W, affine=(scale, shift)),
                               chunk_rows=2)
    assert torch.equal(h["published"], stage2_passes.class_histogram(A, targets, 2, 0.1))
    assert h["published"].tolist() == [[2, 1], [1, 2]]
    # after the BN: channel 0 keeps S, channel 1 is -S + 0.5: rows 0..3 -> [2, 1.5], [-3, -3.5], [1, -0.5], [-1, 2.5]
    assert h["positive_activation"].tolist() == [[1, 1], [1, 1]]
    assert h["negative_layer_activation"].tolist() == [[1, 1], [0, 1]]
    # without a BatchNorm the layer's own sign decides
    h0 = stage2_passes.sign_histograms(A, targets, S.reshape(5, 2, 1, 1), 2, 0.1, SummedLayer(W))
    assert h0["positive_activation"].tolist() == [[1, 0], [1, 1]]


@pytest.fixture(scope="module")
def tiny_store(image_root, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("bn_sign_store"))
    run_stage("get_importances_for_classes.py", "--data_dir", image_root, "--store_dir", store,
              "--model", TINY, *RUNTIME)
    return store


def stage2(image_root, store, out, *extra):
    """Stage 2 in this process (as test_cli does: no interpreter start-up on a busy machine)."""
    proc = run_inproc("get_cosine_similarities.py", "--data_dir", image_root, "--store_dir", store, "--model", TINY,
                      "--proportion_attribution_required", TAU, "--p", P, "--out_dir", out, *RUNTIME, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def results(store, out):
    return {**tree_bytes(os.path.join(out, "results_get_cosine_similarities")),
            **{"store/" + k: v for k, v in tree_bytes(os.path.join(store, "results_get_cosine_similarities")).items()}}


@pytest.mark.slow
def test_stage2_importance_sign(image_root, tiny_store, tmp_path):
    """published is byte-identical to no flag and its histogram is the published rule; positive_activation
    writes its own files, and its histogram equals the rule applied to attributions and post-BatchNorm sums
    from a model pass with hooks."""
    import shutil
    outs = []
    for k, extra in enumerate(([], ["--importance_sign", "published"])):
        out = str(tmp_path / f"out{k}")
        shutil.rmtree(os.path.join(tiny_store, "results_get_cosine_similarities"), ignore_errors=True)
        stdout = stage2(image_root, tiny_store, out, *extra).stdout
        outs.append((results(tiny_store, out), stdout.replace(out, "OUT")))
    assert outs[0][0] == outs[1][0] and outs[0][0]
    assert outs[0][1] == outs[1][1]

    out = str(tmp_path / "out_pos")
    proc = stage2(image_root, tiny_store, out, "--importance_sign", "positive_activation")
    assert "importance_sign positive_activation" in proc.stdout and "bn3" in proc.stdout
    res = os.path.join(tiny_store, "results_get_cosine_similarities")
    with open(os.path.join(res, f"{TINY_TAG}_required{TAU}_histograms_positive_activation.json")) as f:
        saved = json.load(f)
    assert saved["importance_sign"] == "positive_activation"
    assert saved["sign_report"]["batchnorm"] == "bn3"
    assert os.path.isfile(os.path.join(out, "results_get_cosine_similarities",
                                       f"{TINY_TAG}_required{TAU}_p{P}_cossim0.0to1.0_positive_activation.txt"))
    # the same rule from a model pass with hooks over the training images
    from utils.data import folders
    model = tiny_models.tiny_resnet()
    ds = folders.image_folder(image_root, "train")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    targets = torch.tensor(ds.targets)
    x, a, g, _ = tap.logits_and_layer_grad(model, model.conv3, images, targets)
    important = attribution.important_channels(attribution.channel_attribution(a, g).half(), TAU)
    pre, after = hooked_sums(model, model.conv3, model.bn3, images)
    want = torch.zeros(len(ds.classes), 16, dtype=torch.int64)
    want.index_add_(0, targets, (important & (after > 0)).to(torch.int64))
    assert saved["histogram_class_by_channel"] == want.tolist()
    # the published files (no flag): the rule without the sign, from the same model pass
    with open(os.path.join(res, f"{TINY_TAG}_required{TAU}_histograms.json")) as f:
        published = json.load(f)["histogram_class_by_channel"]
    want_published = torch.zeros(len(ds.classes), 16, dtype=torch.int64)
    want_published.index_add_(0, targets, important.to(torch.int64))
    assert published == want_published.tolist() and published != want.tolist()
    report = saved["sign_report"]
    assert report["important_image_channel_pairs"] == int(important.sum())
    assert report["important_with_negative_layer_activation"] == int((important & (pre < 0)).sum())
