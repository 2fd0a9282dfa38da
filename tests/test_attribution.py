"""Stage-1 math: channel attributions, predictions, the head-only backward, closed-form ARVs.

Every expected value comes from an independent computation: captum's LayerGradientXActivation,
plain autograd through the whole network, F.unfold, or explicit Python loops.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradientXActivation

from tests.tiny_models import tiny_resnet, tiny_vgg
from utils.model import tap
from utils.method import attribution
from utils.stages import stage1_pass
from utils.method import similarities


def _frozen(model):
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model.eval()


def _resnet18():
    torch.manual_seed(3)
    return _frozen(torchvision.models.resnet18(weights=None, num_classes=4))


def _labels_not_predictions(model, images, num_classes=4):
    """Labels that differ from the prediction for every other image (attribution is to the label)."""
    with torch.no_grad():
        pred = model(images).argmax(dim=1)
    labels = pred.clone()
    labels[::2] = (pred[::2] + 1) % num_classes
    return labels


def _captum_per_image(model, layer, images, labels):
    """sum_{h,w} of captum's LayerGradientXActivation, one image at a time: (N, C_out) float32."""
    lga = LayerGradientXActivation(model, layer)
    rows = []
    for n in range(len(images)):
        attr = lga.attribute(images[n:n + 1].clone(), target=int(labels[n]))
        rows.append(attr.detach().float().sum(dim=(2, 3))[0])
    return torch.stack(rows)


@pytest.mark.parametrize("which", ["tiny_resnet_conv3", pytest.param("resnet18_layer4.1.conv2", marks=pytest.mark.slow)])
def test_stage1_attributions_equal_captum_and_predictions_equal_argmax(which):
    if which == "tiny_resnet_conv3":
        model, path = _frozen(tiny_resnet()), "conv3"
        torch.manual_seed(10)
        images = torch.randn(6, 3, 72, 64)
    else:
        model, path = _resnet18(), "layer4.1.conv2"
        torch.manual_seed(11)
        images = torch.randn(5, 3, 96, 96)
    conv = model.get_submodule(path)
    labels = _labels_not_predictions(model, images)

    A, pred, P = stage1_pass.stage1_batch(model, conv, images, labels)
    ref = _captum_per_image(model, conv, images, labels)

    assert A.dtype == torch.float16 and A.shape == (len(images), conv.out_channels)
    scale = ref.abs().max()
    assert scale > 0
    # float16 storage: ~5e-4 relative per value; also allow a small absolute slack relative to the scale
    torch.testing.assert_close(A.float(), ref, rtol=2e-3, atol=2e-3 * float(scale))
    # the attributions must be to the label and not to the prediction: those differ clearly here
    ref_pred = _captum_per_image(model, conv, images, pred)
    assert (ref_pred - ref).abs().max() > 0.05 * scale

    with torch.no_grad():
        logits = model(images)
    assert torch.equal(pred, logits.argmax(dim=1))
    assert pred.dtype == torch.int64

    # the patch sums stage 1 stores are those of the layer's actual input (unfold, summed over positions)
    x = tap.layer_input(model, conv, images)
    assert torch.equal(x, tap.layer_input_output(model, conv, images)[0])  # the input whether the layer runs or not
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    expect_P = cols.sum(dim=2).reshape(P.shape)
    torch.testing.assert_close(P.double(), expect_P, rtol=1e-5, atol=1e-5 * float(expect_P.abs().max()))


def test_logits_and_layer_grad_match_full_autograd():
    """x, a, g, logits of the head-only backward equal those of ordinary autograd through the whole net."""
    model = _frozen(tiny_vgg())
    conv = model.features[6]
    torch.manual_seed(12)
    images = torch.randn(3, 3, 209, 209)
    labels = torch.tensor([2, 0, 3])
    x, a, g, logits = tap.logits_and_layer_grad(model, conv, images, labels)

    store = {}

    def hook(m, inp, out):
        store["x"] = inp[0]
        out.retain_grad()
        store["a"] = out

    h = conv.register_forward_hook(hook)
    img = images.clone().requires_grad_(True)  # makes the whole graph exist down to the image
    z = model(img)
    h.remove()
    z.gather(1, labels[:, None]).sum().backward()
    torch.testing.assert_close(x, store["x"].detach())
    torch.testing.assert_close(a, store["a"].detach())
    torch.testing.assert_close(g, store["a"].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits, z.detach())
    # per-image gradients: image n's gradient only holds d z_{y_n}
    assert g.shape == a.shape and (g[1].abs().sum() > 0)


def _leaves_reachable(grad_fn):
    """Every tensor held by an AccumulateGrad node reachable from ``grad_fn``: the graph's leaves."""
    seen, stack, leaves = set(), [grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves, len(seen)


def test_no_graph_below_the_layer_and_nothing_reaches_the_image():
    """Even with an image that requires grad and unfrozen parameters below L, the logits' graph starts
    at L's output: no parameter below L and not the image is a leaf of it, and no gradient reaches them."""
    model = tiny_resnet()  # parameters require grad here (not frozen)
    conv = model.conv3
    below = [p for name, p in model.named_parameters() if name.startswith(("stem", "conv1", "bn1", "conv2", "bn2"))]
    above = [model.bn3.weight, model.bn3.bias, model.fc.weight, model.fc.bias]
    assert all(p.requires_grad for p in below)
    torch.manual_seed(13)
    images = torch.randn(4, 3, 64, 64).requires_grad_(True)
    fired = []
    images.register_hook(lambda grad: fired.append("image"))
    for p in below:
        p.register_hook(lambda grad: fired.append("param"))
    captured = {}
    handle = model.fc.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o))
    x, a, g, logits = tap.logits_and_layer_grad(model, conv, images, torch.tensor([0, 1, 2, 3]))
    handle.remove()

    leaves, n_nodes = _leaves_reachable(captured["logits"].grad_fn)
    leaf_ids = {id(t) for t in leaves}
    assert id(images) not in leaf_ids
    assert not any(id(p) in leaf_ids for p in below)
    assert all(id(p) in leaf_ids for p in above)  # the walk does see the head's leaves
    assert fired == []
    assert images.grad is None and all(p.grad is None for p in below)
    assert not x.requires_grad
    # and with the pipeline's frozen model and plain images, nothing below L is recorded at all
    _frozen(model)
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.requires_grad))
             for m in (model.stem, model.conv1, model.bn1, model.conv2, model.bn2)]
    after = []
    hooks.append(model.bn3.register_forward_hook(lambda m, i, o: after.append(o.requires_grad)))
    tap.logits_and_layer_grad(model, conv, images.detach(), torch.tensor([0, 1, 2, 3]))
    for h in hooks:
        h.remove()
    assert outs and not any(outs)
    assert after == [True]


# ---------------------------------------------------------------------------- closed-form ARVs

CONVS = {
    "1x1": dict(in_channels=6, out_channels=5, kernel_size=1, bias=False),
    "1x1_stride2": dict(in_channels=6, out_channels=5, kernel_size=1, stride=2, bias=False),
    "3x3_s2_p1_bias": dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, padding=1, bias=True),
    "3x3_d2_p2": dict(in_channels=6, out_channels=5, kernel_size=3, padding=2, dilation=2, bias=True),
    "3x2_mixed": dict(in_channels=4, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                      dilation=(1, 2), bias=False),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_closed_form_arv_equals_autograd_gradient_times_input(name):
    torch.manual_seed(20)
    conv = nn.Conv2d(**CONVS[name]).double()
    x = torch.randn(3, conv.in_channels, 11, 10, dtype=torch.float32)  # odd sizes: stride leaves a remainder

    P = attribution.conv_patch_sums(x, conv)
    assert P.dtype == torch.float32 and P.shape == (3, conv.in_channels) + tuple(conv.kernel_size)

    # explicit patch sums from the definition, with Python loops over output positions
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x.double(), (pw, pw, ph, ph))
    ho = (11 + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (10 + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    loopP = torch.zeros(P.shape, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            for h in range(ho):
                for w in range(wo):
                    loopP[:, :, i, j] += xp[:, :, h * sh + i * dh, w * sw + j * dw]
    torch.testing.assert_close(P.double(), loopP, rtol=1e-6, atol=1e-5)

    for c in range(conv.out_channels):
        xr = x.double().requires_grad_(True)
        a = conv(xr)
        (grad,) = torch.autograd.grad(a[:, c].sum(), xr)
        r_autograd = (grad * xr).sum(dim=(2, 3)).detach()  # (N, C_in)
        r_closed = similarities.arv(conv.weight[c].detach(), P)
        torch.testing.assert_close(r_closed, r_autograd, rtol=1e-5, atol=1e-5)
        # completeness: the channel's spatial sum is sum_k r[k] plus the bias on every output position
        total = a[:, c].sum(dim=(1, 2)).detach()
        bias = 0.0 if conv.bias is None else float(conv.bias[c].detach()) * a.shape[2] * a.shape[3]
        torch.testing.assert_close(r_closed.sum(dim=1) + bias, total, rtol=1e-5, atol=1e-5)


def test_class_arv_is_mean_of_image_arvs():
    """R_y^c from the class mean of P equals the mean of the per-image autograd ARVs."""
    torch.manual_seed(21)
    conv = nn.Conv2d(4, 3, 3, stride=2, padding=1).double()
    x = torch.randn(5, 4, 9, 9)
    P = attribution.conv_patch_sums(x, conv)
    per_image = []
    for n in range(5):
        xr = x[n:n + 1].double().requires_grad_(True)
        (grad,) = torch.autograd.grad(conv(xr)[:, 1].sum(), xr)
        per_image.append((grad * xr).sum(dim=(2, 3))[0].detach())
    expect = torch.stack(per_image).mean(dim=0)
    got = similarities.arv(conv.weight[1].detach(), P.double().mean(dim=0))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- importance, relative attribution

def test_important_channels_against_loop():
    torch.manual_seed(30)
    A = (torch.randn(7, 9) * 3).half()
    A[3] = -A[3].abs()  # an image with no positive attribution: threshold 0
    for tau in (0.0, 0.03, 0.2):
        got = attribution.important_channels(A, tau)
        for n in range(7):
            total = sum(max(float(A[n, c]), 0.0) for c in range(9))
            for c in range(9):
                assert bool(got[n, c]) == (float(A[n, c]) >= tau * total), (tau, n, c)
    # the boundary counts: A = [1, 1, 2], tau = 0.25 -> threshold exactly 1
    assert attribution.important_channels(torch.tensor([[1.0, 1.0, 2.0, -5.0]]), 0.25).tolist() == \
        [[True, True, True, False]]
    assert attribution.important_channels(torch.tensor([[1.0, 1.0, 2.0, -5.0]]), 0.2501).tolist() == \
        [[False, False, True, False]]


def test_relative_and_positive_attribution_against_loop():
    torch.manual_seed(31)
    a = torch.randn(3, 4, 5, 6)
    g = torch.randn(3, 4, 5, 6)
    pos = attribution.positive_attribution(a, g)
    chan = attribution.channel_attribution(a, g)
    for channel in range(4):
        rel = attribution.relative_attribution(a, g, channel)
        for n in range(3):
            num = {}
            signed = {}
            for c in range(4):
                num[c] = sum(max(float(a[n, c, h, w]) * float(g[n, c, h, w]), 0.0)
                             for h in range(5) for w in range(6))
                signed[c] = sum(float(a[n, c, h, w]) * float(g[n, c, h, w]) for h in range(5) for w in range(6))
                assert float(pos[n, c]) == pytest.approx(num[c], rel=1e-5, abs=1e-6)
                assert float(chan[n, c]) == pytest.approx(signed[c], rel=1e-5, abs=1e-5)
            assert float(rel[n]) == pytest.approx(num[channel] / sum(num.values()), rel=1e-5)
    # positive part per position: a channel whose total a*g is negative can still have rel > 0
    a1 = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])
    g1 = torch.tensor([[[[3.0, -5.0]], [[1.0, 0.0]]]])
    assert float(attribution.relative_attribution(a1, g1, 0)[0]) == pytest.approx(3.0 / 4.0)
    assert float(attribution.channel_attribution(a1, g1)[0, 0]) == pytest.approx(-2.0)
    # no positive attribution at all: rel is 0, not NaN
    assert float(attribution.relative_attribution(-a1.abs(), g1.abs(), 0)[0]) == 0.0


def test_layer_followed_by_inplace_relu():
    """torchvision's VGGs put ReLU(inplace=True) right after each conv: stage 1 must give the same numbers
    as for the same network with an out-of-place ReLU (it used to fail on the in-place op on the leaf)."""
    import copy

    import torch.nn as nn

    from utils.stages.stage1_pass import stage1_batch

    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 5, 3, stride=2),
                            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    plain = copy.deepcopy(inplace)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    for layer in ("0", "2"):
        got = stage1_batch(inplace, inplace.get_submodule(layer), x, y)
        want = stage1_batch(plain, plain.get_submodule(layer), x, y)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert got[0].float().abs().sum() > 0
