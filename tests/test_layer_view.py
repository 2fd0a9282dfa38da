"""Grouped convolutions and Linear layers over channels (``utils.model.layer_view``): attributions and patch
sums against captum and brute force, the split's exactness (one channel and the whole layer), the default layer
and the refusals of ``utils.model.layer_survey``. A tiny model built here has every kind: a grouped conv
(ResNeXt-like), a Linear over (N, H, W, C) (ConvNeXt's pointwise layers), a Linear over (N, T, C) (a ViT MLP)
and a Linear head over (N, C)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.disentangle import disentangled_model
from utils.method import attribution, similarities, split
from utils.model import layer_survey, loading, tap
from utils.model.layer_view import LayerView, dense_weight
from utils.model.whole_layer import build_whole_layer_model
from utils.errors import UserError
from tests.tiny_models import mixed_net

LAYERS = ("grouped", "pw", "mlp.0", "head")


@pytest.fixture(scope="module")
def net():
    m = mixed_net()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def images(n=5, seed=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def native_output(net, module, x):
    out = {}
    h = module.register_forward_hook(lambda mod, i, o: out.setdefault("a", o))
    with torch.no_grad():
        net(x)
    h.remove()
    return out["a"]


@pytest.mark.parametrize("name", LAYERS)
def test_attributions_equal_captum(net, name):
    """A[n, c] = sum over positions of a * dz_y/da, from the channel-first tap, equals captum's
    LayerGradientXActivation summed over every axis but the unit's."""
    from captum.attr import LayerGradientXActivation
    view = LayerView(net.get_submodule(name))
    x, labels = images(), torch.tensor([0, 1, 2, 3, 1])
    _, a, g, _ = tap.logits_and_layer_grad(net, view, x, labels)
    ours = attribution.channel_attribution(a, g)
    for p in net.parameters():
        p.requires_grad_(True)
    try:
        theirs = LayerGradientXActivation(net, view.module).attribute(x, target=labels)
    finally:
        for p in net.parameters():
            p.requires_grad_(False)
    channel_axis = 1 if isinstance(view.module, nn.Conv2d) else theirs.dim() - 1
    dims = [d for d in range(1, theirs.dim()) if d != channel_axis]
    theirs = theirs.sum(dim=dims) if dims else theirs
    assert ours.shape == (5, view.out_channels)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LAYERS)
def test_patch_sums_give_each_units_summed_output(net, name):
    """sum over positions of a[n, c] = sum_{i,k} W[c, i, k] P[n, i, k] + b[c] * positions (the ARV identity),
    with a the layer's own output in its own layout and W the view's weight (dense for the grouped conv)."""
    view = LayerView(net.get_submodule(name))
    x = images()
    x_cf, a_cf = tap.layer_input_output(net, view, x)
    a = native_output(net, view.module, x)
    positions = a_cf.shape[-2] * a_cf.shape[-1]
    P = attribution.conv_patch_sums(x_cf, view)
    s = similarities.summed_activation(P, view.weight, view.bias, positions)
    summed = a.double().sum(dim=(2, 3)) if isinstance(view.module, nn.Conv2d) else \
        a.double().reshape(a.shape[0], -1, a.shape[-1]).sum(dim=1)
    torch.testing.assert_close(torch.as_tensor(s).double(), summed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_cf.sum(dim=(2, 3)).double(), summed, rtol=1e-5, atol=1e-5)


def test_grouped_dense_weight_is_the_same_conv_and_zero_outside_each_group(net):
    view = LayerView(net.grouped)
    W = view.weight
    assert W.shape == (12, 8, 3, 3)
    for c in range(12):
        inside = list(view.unit_inputs(c))
        assert inside == (list(range(0, 4)) if c < 6 else list(range(4, 8)))
        outside = [i for i in range(8) if i not in inside]
        assert W[c, outside].abs().max() == 0 and torch.equal(W[c, inside], net.grouped.weight[c])
    x8 = torch.randn(3, 8, 9, 7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(F.conv2d(x8, W, net.grouped.bias, padding=1), net.grouped(x8), rtol=1e-5, atol=1e-5)
    assert torch.equal(dense_weight(torch.ones(4, 1, 1, 1), 2).flatten(1), torch.tensor(
        [[1., 0.], [1., 0.], [0., 1.], [0., 1.]]))


@pytest.mark.parametrize("name,k", [(name, 2) for name in LAYERS] + [("grouped", 3), ("mlp.0", 3)])
def test_split_network_has_the_original_logits(net, name, k):
    """The checkpoint [D_1..D_k, R] of a channel, from random ARVs, swapped into the network: same logits; the
    maps of the filters add back to the channel's own map."""
    view = LayerView(net.get_submodule(name))
    c = 5
    g = torch.Generator().manual_seed(4 + k)
    arvs = torch.rand(k, view.in_channels, generator=g) * view.weight[c].abs().sum(dim=(1, 2))
    filters = split.split_filter_k(view.weight[c], arvs, 0.6)
    sd = split.checkpoint_state_dict(filters, None if view.bias is None else view.bias[c])
    x = images(6, seed=9)
    z = net(x)
    dnet = disentangled_model(net, name, c, sd)
    torch.testing.assert_close(dnet(x), z, rtol=1e-5, atol=1e-5)
    x_cf, a_cf = tap.layer_input_output(net, view, x)
    maps = split.filter_maps(x_cf, view, filters, None if view.bias is None else view.bias[c].repeat(k + 1))
    assert split.merged_map_difference(maps[:, None], a_cf[:, c]).max() < 1e-4
    whole = build_whole_layer_model(net, name, {c: sd})
    assert whole.get_submodule(name)[0].weight.shape[0] == view.out_channels + k
    torch.testing.assert_close(whole(x), z, rtol=1e-5, atol=1e-5)


def test_default_layer_listing_and_refusals(net):
    assert layer_survey.default_layer(net, 16) == "mlp.0"   # the MLP's first Linear, not the head on (N, C)
    rows = {n: note for n, _, note in layer_survey.listing(net, 16)}
    assert rows["grouped"] == "grouped conv, groups 2" and "not supported" in rows["dw"]
    assert rows["mlp.0"].endswith("<- last_conv (the default)") and rows["head"] == "Linear"
    with pytest.raises(UserError, match="depthwise.*nearest supported layer after it is pw"):
        loading.resolve_layer(net, "dw", 16)
    with pytest.raises(UserError, match="not a Conv2d or Linear"):
        loading.resolve_layer(net, "bn", 16)
    path, view = loading.resolve_layer(net, "last_conv", 16)
    assert path == "mlp.0" and view.kind == "linear" and view.out_channels == 14


def test_linear_the_forward_never_calls_is_refused():
    mha = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(2))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.attn, self.fc = mha, nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            t = self.pre(x).transpose(1, 2)
            return self.fc(self.attn(t, t, t)[0].mean(dim=1))
    with pytest.raises(UserError, match="never called as a module"):
        loading.resolve_layer(Attn().eval(), "attn.out_proj", 8)


def test_fixed_input_size_is_one_line():
    class Fixed(nn.Module):
        image_size = 224
    with pytest.raises(UserError, match="--crop 160: --model vit_b_16 takes only 224 x 224"):
        loading.check_input_size(Fixed(), "vit_b_16", 160)


S1, S2, S3, S4 = ("get_importances_for_classes.py", "get_cosine_similarities.py", "disentangle_channel.py",
                  "get_results.py")
RUN = ["--num_workers", "0", "--device", "cpu", "--batch_size", "8"]


def ok(script, *args):
    from tests.test_cli import run_inproc
    r = run_inproc(script, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.parametrize("layer", [pytest.param("grouped", marks=pytest.mark.slow), None])
def test_stages_1_to_4_on_a_grouped_conv_and_the_default_linear(image_root, tmp_path, layer):
    """The four stages on the grouped conv and on the default layer (the MLP's first Linear, over tokens): stage 3
    writes its checkpoint only when the split network's logits equal the original's (it says so), stage 4 reads
    it back and scores it."""
    import json
    import os
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    pick = [] if layer is None else ["--layer_of_interest", layer]
    ok(S1, "--data_dir", image_root, "--model", "tests.tiny_models:mixed_net", "--crop", 16, "--resize", 18,
       "--store_dir", store, *pick, *RUN)
    manifest = json.load(open(next(os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs
                                    if f == "manifest.json")))
    assert manifest["layer"] == (layer or "mlp.0")
    assert manifest["layer_geometry"].get("groups") == (2 if layer else None)
    ok(S2, "--store_dir", store, "--model", "tests.tiny_models:mixed_net", "--out_dir", out, "--proportion_attribution_required", 0.1, "--p", 0.5, *RUN)
    ok(S2, "--store_dir", store, "--model", "tests.tiny_models:mixed_net", "--label_free", "--channels", 3, 4, "--top_n", 8, "--k", 2, *RUN)
    job = ["--classes_for_concept1", 0, "--classes_for_concept2", 1]
    s3 = ok(S3, "--store_dir", store, "--model", "tests.tiny_models:mixed_net", "--channel_disentangle", 3, *job, "--export_model", *RUN)
    infos = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs if f.endswith("_info.json")]
    assert infos and all(json.load(open(p))["exact"] for p in infos), s3.stdout
    exported = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs if f.endswith("_f_best_model.json")]
    assert len(exported) == 1 and ("Linear(10, 16" if layer is None else "Conv2d(8, 14") in \
        json.load(open(exported[0]))["layer_replaced_by"][0]
    extras = [] if layer else ["--get_feature_vis", "--fv_size", 24, "--fv_steps", 2, "--fv_crops", 2,
                               "--fv_spectrum_images", 4, "--get_sae_view", "--sae_steps", 5, "--sae_train_images", 8]
    s4 = ok(S4, "--model_dir", store, "--model", "tests.tiny_models:mixed_net", "--channel_of_interest", 3, *job, "--get_quantitative", "--out_dir", out,
            *extras, *RUN)
    if extras:
        assert any(f.endswith("_feature_vis.json") for _, _, fs in os.walk(out) for f in fs), s4.stdout
    cands = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs if f.endswith("_candidates.json")]
    whole = ok(S3, "--store_dir", store, "--model", "tests.tiny_models:mixed_net", "--candidates", cands[0], "--top", 2, "--export_model", *RUN)
    assert "its logits equal the original's" in whole.stdout
    from utils.model.whole_layer import load_exported_whole_layer
    js = [os.path.join(r, f) for r, _, fs in os.walk(store) for f in fs if f.endswith("_whole_layer_model.json")]
    net, x = load_exported_whole_layer(js[0], model="tests.tiny_models:mixed_net"), images(3)
    torch.testing.assert_close(net(x), mixed_net()(x), rtol=1e-4, atol=1e-5)


def tiny_torchvision(family):
    """Reduced members of torchvision's families (their own classes at tiny widths): (model, input size)."""
    import torchvision
    from torchvision.models import ConvNeXt, MaxVit, ResNet, SwinTransformer, VisionTransformer
    from torchvision.models.convnext import CNBlockConfig
    from torchvision.models.resnet import Bottleneck
    torch.manual_seed(0)
    m, size = {
        "vit": lambda: (VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                          mlp_dim=32, num_classes=5), 32),
        "swin": lambda: (SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                         window_size=[2, 2], num_classes=5), 32),
        "convnext": lambda: (ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5), 32),
        "maxvit": lambda: (MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5), 32),
        "resnext": lambda: (ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=2, num_classes=5), 32),
        "squeezenet": lambda: (torchvision.models.squeezenet1_1(num_classes=5), 64),
    }[family]()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m, size


@pytest.mark.parametrize("family,layer", [
    ("vit", "encoder.layers.encoder_layer_1.mlp.0"),                       # the last MLP's first Linear
    ("swin", "features.3.0.mlp.0"),
    ("maxvit", "blocks.1.layers.0.layers.grid_attention.mlp_layer.1"),
    ("convnext", "features.3.0.block.5"),                                   # the last pointwise Linear
    ("squeezenet", "features.12.expand3x3"),                                # not the classifier conv (the logits)
    ("resnext", "layer4.0.conv2")])                                         # a grouped conv (not the default)
def test_torchvision_families_reduced(family, layer):
    """The default layer of each transformer family and SqueezeNet, and on it (ResNeXt: its grouped conv) the
    split of channel 1 gives the original's logits."""
    model, size = tiny_torchvision(family)
    if family != "resnext":
        assert layer_survey.default_layer(model, size) == layer
    path, view = loading.resolve_layer(model, layer, size)
    assert view.kind == ("grouped" if family == "resnext" else "conv" if family == "squeezenet" else "linear")
    arvs = torch.rand(2, view.in_channels, generator=torch.Generator().manual_seed(0))
    sd = split.checkpoint_state_dict(split.split_filter_k(view.weight[1], arvs, 0.5),
                                     None if view.bias is None else view.bias[1])
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(disentangled_model(model, path, 1, sd)(x), model(x), rtol=1e-4, atol=1e-5)
