"""The whole-layer network: every split channel of one conv layer replaced at once (``utils.method.whole_layer``).

``build_whole_layer_model(model, layer_path, {channel: checkpoint})`` returns a copy of the model whose layer
is ``WholeLayer``: ``Sequential(L', merge)``, L' a Conv2d with one row per unit and residue (``layout``),
the merge a ``SparseMerge`` holding one target channel and one coefficient per row of L' (not a 1x1 conv:
that would be a mostly-zero C_out x M matrix; see the method module). Its output, and the logits, equal the
original's. ``export_whole_layer`` writes the network's state dict and a JSON saying how to rebuild it;
``load_exported_whole_layer(json)`` rebuilds it without the checkpoints.
"""
import copy
import os

import torch
import torch.nn as nn

from utils.model.checkpoint import (checkpoint_problem, concepts_of_checkpoint, conv_geometry, exported_state_dict,
                                    exported_weights)
from utils.method import whole_layer as wl
from utils.model import loading
from utils.model.layer_view import as_view, describe, set_weight
from utils.errors import UserError


class SparseMerge(nn.Module):
    """(N, M, H, W) maps of L' -> (N, C_out, H, W): ``out[:, target[m]] += coeff[m] * maps[:, m]``.

    ``target`` (M,) int64 and ``coeff`` (M,) are buffers, so that the state dict holds them; the passes of the
    merge (``merge_passes``) are computed once per ``target`` and device."""

    def __init__(self, target, coeff, c_out, channel_last=False):
        super().__init__()
        self.c_out, self.channel_last = c_out, channel_last
        self.register_buffer("target", target.clone())
        self.register_buffer("coeff", coeff.clone())
        self._passes = (None, None)

    def passes(self):
        key = (self.target.device, self.target.data_ptr(), self.target._version)
        if self._passes[0] != key:
            self._passes = (key, wl.merge_passes(self.target))
        return self._passes[1]

    def forward(self, maps):
        if self.channel_last:  # after a Linear: (N, ..., M) -> (N, ..., C_out)
            return wl.merge_maps(maps.movedim(-1, 1), self.target, self.coeff, self.c_out, self.passes()).movedim(1, -1)
        return wl.merge_maps(maps, self.target, self.coeff, self.c_out, self.passes())

    def extra_repr(self):
        return f"{self.target.shape[0]} -> {self.c_out}"


class WholeLayer(nn.Sequential):
    """``Sequential(L', SparseMerge)`` with ``layout``: the (channel, part) of every row of L'
    (``utils.method.whole_layer.row_layout``)."""

    def __init__(self, wide, merge, layout):
        super().__init__(wide, merge)
        self.layout = [tuple(r) for r in layout]


def empty_whole_layer(conv, layout):
    """A ``WholeLayer`` of ``layout`` for ``conv`` (a Conv2d, grouped Conv2d or Linear, or its LayerView) with
    zero weights (``load_state_dict`` fills it): L' with ``conv``'s geometry and one row per entry of ``layout``
    (``LayerView.wide_layer``: a Linear for a Linear, a dense Conv2d for a grouped conv), on its device, frozen."""
    view = as_view(conv)
    m = len(layout)
    weight = view.module.weight
    merge = SparseMerge(torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=weight.dtype), view.out_channels,
                        channel_last=view.kind == "linear")
    layer = WholeLayer(view.wide_layer(m, dtype_too=True), merge.to(weight.device), layout)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def check_checkpoints(conv, layer_path, checkpoints):
    """Refuse (UserError, one line) no checkpoint, a channel outside the layer, or a checkpoint that does not fit
    ``conv`` (``utils.model.checkpoint.checkpoint_problem``)."""
    if not checkpoints:
        raise UserError(f"no checkpoint given for layer {layer_path}")
    for c, sd in checkpoints.items():
        if not isinstance(c, int) or not 0 <= c < conv.out_channels:
            raise UserError(f"channel {c}: layer {layer_path} has channels 0..{conv.out_channels - 1}")
        problem = checkpoint_problem(sd, conv)
        if problem:
            raise UserError(f"checkpoint of channel {c}: {problem} for layer {layer_path}")


def whole_layer_conv(conv, checkpoints, layer_path="the layer"):
    """The ``WholeLayer`` replacing ``conv`` for {channel: checkpoint state dict}; same function as ``conv``."""
    conv = as_view(conv)
    check_checkpoints(conv, layer_path, checkpoints)
    ks = {c: concepts_of_checkpoint(sd) for c, sd in checkpoints.items()}
    layout = wl.row_layout(conv.out_channels, ks)
    splits = {c: (sd["disentangled.weight"], sd.get("disentangled.bias")) for c, sd in checkpoints.items()}
    merges = {c: sd["merged.weight"] for c, sd in checkpoints.items()}  # checked: every checkpoint has one
    weight, bias = wl.wide_filters(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                   splits, layout)
    target, coeff = wl.merge_entries(layout, merges, conv.weight.dtype)
    layer = empty_whole_layer(conv, layout)
    with torch.no_grad():
        set_weight(layer[0], weight)
        if bias is not None:
            layer[0].bias.copy_(bias)
        layer[1].target.copy_(target)
        layer[1].coeff.copy_(coeff)
    return layer


def build_whole_layer_model(model, layer_path, checkpoints):
    """A copy of ``model`` whose layer ``layer_path`` is ``whole_layer_conv`` of {channel: checkpoint state dict}."""
    new = copy.deepcopy(model)
    conv = new.get_submodule(layer_path)
    loading.replace_module(new, layer_path, whole_layer_conv(conv, checkpoints, layer_path))
    return new


def layer_units(net, layer_path):
    """The units of the whole-layer network's layer: [(row of L', channel, part)], part None for an untouched
    channel, j for D_j (``utils.method.whole_layer.units``)."""
    return wl.units(net.get_submodule(layer_path).layout)


def read_checkpoint(checkpoint):
    """A checkpoint path (read to a state dict; a missing or unreadable file is a UserError) or a state dict."""
    if isinstance(checkpoint, dict):
        return checkpoint
    from utils.files import reading
    if not os.path.isfile(checkpoint):
        raise UserError(f"{checkpoint}: no such checkpoint file")
    return reading.load_state_dict(checkpoint, "checkpoint", "pass a checkpoint that disentangle_channel.py wrote")


def load_whole_layer_model(model, weights=None, layer="last_conv", checkpoints=None):
    """The whole-layer network as a plain ``nn.Module`` (eval mode, frozen), as ``load_disentangled_model``:
    ``model``, ``weights``, ``layer`` as ``--model``, ``--weights``, ``--layer_of_interest``; ``checkpoints``:
    {channel: ``…_unnormalized.pth`` path or its state dict}."""
    base, _ = loading.load_model(model, weights)
    path, _ = loading.resolve_layer(base, layer)
    sds = {c: read_checkpoint(ck) for c, ck in (checkpoints or {}).items()}
    return build_whole_layer_model(base, path, sds).eval()


def export_whole_layer(paths, net, model_spec, weights_id, layer_path, checkpoint_names):
    """Write ``paths`` = (state dict ``.pth``, ``.json``) of the whole-layer network ``net``: its state dict and
    how to rebuild it (the keys of stage 3's exported single-channel network where they apply).
    ``checkpoint_names``: {channel: checkpoint file name}. Returns ``paths``."""
    from utils.files import atomic
    pth, js = paths
    layer = net.get_submodule(layer_path)
    wide, c_out, m = layer[0], layer[1].c_out, len(layer.layout)
    weights = exported_weights(weights_id)
    atomic.save_torch(pth, exported_state_dict(net))
    atomic.write_json(js, {
        "model": model_spec, "weights": weights, "layer": layer_path,
        "channels": {str(c): os.path.basename(str(n)) for c, n in sorted(checkpoint_names.items())},
        "state_dict": os.path.basename(pth),
        "layer_replaced_by": [describe(wide, None if isinstance(wide, nn.Linear) else conv_geometry(wide)),
                              f"SparseMerge({m} -> {c_out}): out[:, target[m]] += coeff[m] * maps[:, m]"],
        "rows_of_first_conv": [[c, part] for c, part in layer.layout],
        "units": len(wl.units(layer.layout)),
        "rebuild": (f"from utils.model.whole_layer import load_exported_whole_layer; "
                    f"net = load_exported_whole_layer({os.path.basename(js)!r}"
                    # a factory is code: the loader imports it only when the caller names it
                    + (f", model={model_spec!r})" if ":" in str(model_spec) else ")")),
        "without_this_code": (f"replace {layer_path} by torch.nn.Sequential(the Conv2d above, Conv2d({m}, {c_out}, "
                              f"kernel_size=1, bias=False)); load {layer_path}.0.* from the state dict; the 1x1 "
                              f"conv's weight[target[m], m] = coeff[m] ({layer_path}.1.target and .coeff), 0 elsewhere"
                              if not isinstance(wide, nn.Linear) else
                              f"replace {layer_path} by torch.nn.Sequential(the Linear above, Linear({m}, {c_out}, "
                              f"bias=False)); load {layer_path}.0.* from the state dict; the second Linear's "
                              f"weight[target[m], m] = coeff[m] ({layer_path}.1.target and .coeff), 0 elsewhere")})
    return paths


def load_exported_whole_layer(json_path, model=None):
    """The network ``export_whole_layer`` wrote, rebuilt from its JSON and state dict (no checkpoint needed).

    ``model``: the model spec, as ``--model``. A JSON file is data: the torchvision name it records is rebuilt,
    but a factory it records (``module:function``, code) is imported only when ``model`` names it too; another
    ``model`` than the file's is refused (UserError, one line)."""
    from utils.files import atomic
    try:
        spec = atomic.read_json(json_path)
        recorded = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{json_path}: not a whole-layer network's description ({type(e).__name__}: {e})")
    shown = repr(str(recorded))[:120]
    if model is not None and model != recorded:
        raise UserError(f"{json_path} describes a network of model {shown}, not {model!r}")
    if model is None and ":" in str(recorded):
        raise UserError(f"{json_path} names the model factory {shown}: a file's code is never imported on its "
                        f"word; pass model={shown} if you trust that module")
    try:
        base, _ = loading.load_model(spec["model"], spec["weights"])
        conv = base.get_submodule(spec["layer"])
        layout = [(c, part) for c, part in spec["rows_of_first_conv"]]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{json_path}: not a whole-layer network's description ({type(e).__name__}: {e})")
    loading.replace_module(base, spec["layer"], empty_whole_layer(conv, layout))
    sd = read_checkpoint(os.path.join(os.path.dirname(os.path.abspath(json_path)), spec["state_dict"]))
    try:
        base.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{spec['state_dict']}: does not fit {json_path} ({str(e).splitlines()[0]})")
    return base.eval()
