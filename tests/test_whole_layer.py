"""The whole-layer network: every split channel of a layer replaced at once gives back the layer's maps and
the logits, each channel's D_j maps are those of its single-channel disentangled network, the export
rebuilds, and bad checkpoints are refused in one line."""
import json

import pytest
import torch

from utils import disentangle
from utils.files import names
from utils.method import whole_layer as wl
from utils.method.split import checkpoint_state_dict, merge_weights, split_filters_k
from utils.model import loading
from utils.model import whole_layer
from utils.errors import UserError

# (model spec, layer): a VGG-style conv with bias and ReLU; a ResNet-style conv followed by BatchNorm and an
# identity add; the demo's bottleneck conv followed by BatchNorm and a projection add
CASES = [("tests.tiny_models:tiny_vgg", "features.3", 224),
         ("tests.tiny_models:tiny_resnet", "conv1", 64),
         ("demo.model:shapes_resnet", "block.conv3", 224)]
SPLITS = {"k2": {0: 2, 3: 2, 5: 2}, "mixed": {1: 2, 2: 3, 3: 3, 0: 2}}


def _model(spec):
    model, _ = loading.load_model(spec, "none")
    torch.manual_seed(3)
    for m in model.modules():  # BatchNorms with statistics of their own, so that they are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features) + 0.5)
            m.weight.copy_(torch.randn(m.num_features))
    return model


def _checkpoints(conv, ks, seed=0):
    """{channel: checkpoint state dict}: stage 3's split of each channel on random ARVs, at rho = 0.5."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c, k in ks.items():
        arvs = torch.rand((k, conv.in_channels), generator=g)
        filters = split_filters_k(conv.weight.detach()[c], arvs, [0.5])[0]
        assert all(bool(f.abs().sum() > 0) for f in filters[:k])  # every D_j keeps some input
        out[c] = checkpoint_state_dict(filters, None if conv.bias is None else conv.bias.detach()[c])
    return out


def _images(size, n=3):
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(1))


def _output_of(model, module, images):
    got = {}
    h = module.register_forward_hook(lambda m, i, o: got.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        z = model(images)
    h.remove()
    return z, got["out"]


def _close(a, b):
    return float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("spec,layer,size", CASES)
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_logits_and_layer_output_equal_the_original(spec, layer, size, split):
    model = _model(spec)
    conv = model.get_submodule(layer)
    ks = {c: k for c, k in SPLITS[split].items() if c < conv.out_channels}
    net = whole_layer.build_whole_layer_model(model, layer, _checkpoints(conv, ks))
    images = _images(size)
    z, a = _output_of(model, conv, images)
    z2, a2 = _output_of(net, net.get_submodule(layer), images)
    assert _close(z2, z) and _close(a2, a)
    assert model.get_submodule(layer) is conv  # the original model is untouched
    wide = net.get_submodule(layer)[0]
    assert wide.out_channels == conv.out_channels - len(ks) + sum(k + 1 for k in ks.values())
    units = whole_layer.layer_units(net, layer)
    assert len(units) == conv.out_channels - len(ks) + sum(ks.values())
    assert sorted((c, j) for _, c, j in units if j is not None) == sorted(
        (c, j) for c, k in ks.items() for j in range(1, k + 1))


@pytest.mark.parametrize("spec,layer,size", CASES[:2])
def test_every_d_j_equals_the_single_channel_network(spec, layer, size):
    """Rows of L' against the single-channel network's (row c = D1, C_out + j - 2 = D_j, C_out + k - 1 = R)."""
    model = _model(spec)
    conv = model.get_submodule(layer)
    ks = SPLITS["mixed"]
    cks = _checkpoints(conv, ks, seed=4)
    net = whole_layer.build_whole_layer_model(model, layer, cks)
    images = _images(size)
    _, wide_maps = _output_of(net, net.get_submodule(layer)[0], images)
    _, a = _output_of(model, conv, images)
    layout = net.get_submodule(layer).layout
    c_out = conv.out_channels
    for c, k in ks.items():
        single = disentangle.disentangled_model(model, layer, c, cks[c])
        _, maps = _output_of(single, single.get_submodule(layer)[0], images)
        single_rows = {1: c, **{j: c_out + j - 2 for j in range(2, k + 1)}, "R": c_out + k - 1}
        for part, row in single_rows.items():
            assert torch.allclose(wide_maps[:, layout.index((c, part))], maps[:, row], rtol=0, atol=1e-6)
    for c in set(range(c_out)) - set(ks):  # an untouched channel's row is the layer's own map
        assert torch.allclose(wide_maps[:, layout.index((c, None))], a[:, c], rtol=0, atol=1e-6)


def test_sparse_merge_equals_the_dense_one_by_one_conv():
    layout = wl.row_layout(5, {1: 2, 3: 3})
    assert layout == [(0, None), (1, 1), (1, 2), (1, "R"), (2, None), (3, 1), (3, 2), (3, 3), (3, "R"), (4, None)]
    target, coeff = wl.merge_entries(layout, {1: merge_weights(2), 3: merge_weights(3)})
    assert coeff.tolist() == [1, 1, 1, -1, 1, 1, 1, 1, -2, 1]
    maps = torch.randn(2, len(layout), 4, 3, dtype=torch.float64)
    dense = wl.merge_matrix(target, coeff.double(), 5)
    expect = torch.nn.functional.conv2d(maps, dense[:, :, None, None])
    assert torch.allclose(wl.merge_maps(maps, target, coeff, 5), expect, rtol=0, atol=1e-12)
    passes = wl.merge_passes(target)
    assert [p[0].tolist() for p in passes] == [[0, 1, 4, 5, 9], [2, 6], [3, 7], [8]]  # no target twice in a pass
    by_hand = maps[:, 5] + maps[:, 6] + maps[:, 7] - 2 * maps[:, 8]
    assert torch.allclose(wl.merge_maps(maps, target, coeff, 5)[:, 3], by_hand, rtol=0, atol=1e-12)


def test_export_rebuilds_the_network_without_the_checkpoints(tmp_path):
    spec, layer, size = CASES[1]
    model, weights_id = loading.load_model(spec, None)
    conv = model.get_submodule(layer)
    ks = SPLITS["mixed"]
    net = whole_layer.build_whole_layer_model(model, layer, _checkpoints(conv, ks))
    paths = whole_layer.export_whole_layer(names.whole_layer_model(str(tmp_path), "x", "top4"), net, spec,
                                           weights_id, layer, {c: f"ck{c}.pth" for c in ks})
    assert paths[1].endswith("models_disentangled/x_top4_whole_layer_model.json")
    if ":" in spec:  # a factory is code: never imported on the file's word
        with pytest.raises(UserError, match="never imported"):
            whole_layer.load_exported_whole_layer(paths[1])
    back = whole_layer.load_exported_whole_layer(paths[1], model=spec)
    images = _images(size)
    with torch.no_grad():
        assert torch.equal(back(images), net(images))
    rec = json.loads(open(paths[1]).read())
    assert len(rec["rows_of_first_conv"]) == conv.out_channels - len(ks) + sum(k + 1 for k in ks.values())
    assert rec["units"] == conv.out_channels - len(ks) + sum(ks.values())


def test_load_whole_layer_model_reads_checkpoint_files(tmp_path):
    spec, layer, size = CASES[0]
    model, _ = loading.load_model(spec, None)
    conv = model.get_submodule(layer)
    cks = _checkpoints(conv, {2: 2, 7: 3})
    files = {}
    for c, sd in cks.items():
        files[c] = str(tmp_path / f"ck{c}.pth")
        torch.save(sd, files[c])
    net = whole_layer.load_whole_layer_model(spec, None, layer, files)
    images = _images(size)
    with torch.no_grad():
        assert _close(net(images), model(images))


def _bad(conv, kind):
    cks = _checkpoints(conv, {0: 2, 1: 3})
    if kind == "c_in":
        cks[1]["disentangled.weight"] = cks[1]["disentangled.weight"][:, :-1]
    elif kind == "channel":
        cks[conv.out_channels] = cks.pop(1)
    elif kind == "merge":
        cks[0]["merged.weight"] = cks[0]["merged.weight"][:, :2]
    else:
        cks = {}
    return cks


@pytest.mark.parametrize("kind,says", [("c_in", "disentangled.weight has shape"), ("channel", "has channels 0..11"),
                                       ("merge", "merged.weight has shape"), ("none", "no checkpoint")])
def test_bad_checkpoint_is_one_line(kind, says):
    spec, layer, _ = CASES[1]
    model, _ = loading.load_model(spec, None)
    with pytest.raises(UserError) as e:
        whole_layer.build_whole_layer_model(model, layer, _bad(model.get_submodule(layer), kind))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_checkpoint_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        whole_layer.load_whole_layer_model(CASES[1][0], None, CASES[1][1], {0: str(tmp_path / "nope.pth")})
    assert "nope.pth" in str(e.value) and "\n" not in str(e.value)
