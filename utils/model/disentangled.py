"""The disentangled network: a model whose layer is replaced by the split of one channel, same function.

A checkpoint [D_1, ..., D_k, R] with the merge [1, ..., 1, -(k-1)] (``utils.method.split``) becomes
``Sequential(L', M)`` in place of the layer: L' is the layer with k more output channels (row c = D_1, the
new rows D_2 .. D_k and R), M a bias-free 1x1 conv that adds them back into channel c. Here: the surgery
(``disentangled_conv``, ``disentangled_model``, ``disentangled_layer``), the check of its logits against the
original's (``network_check``), what a checkpoint must hold (``checkpoint_problem``), and the export of the
whole network for other tools (``export_model``, ``load_disentangled_model``; exported ``…_model.json`` files
name ``utils.disentangle``, which stays as the path they import).
"""
import contextlib
import copy
import os

import torch
import torch.nn as nn

from utils.files import names
from utils.model.layer_view import as_view, describe, out_units, set_weight
from utils.model.checkpoint import (checkpoint_problem, concepts_of_checkpoint, conv_geometry,  # noqa: F401
                                    exported_state_dict, exported_weights)
from utils.model.loading import replace_module


def disentangled_conv(conv, channel, state_dict):
    """``Sequential(L', M)`` replacing ``conv``, for k = (filters in the checkpoint) - 1 concepts: L' has
    C_out + k output channels (row ``channel`` = D_1, rows C_out .. C_out+k-2 = D_2 .. D_k, row C_out+k-1 = R),
    M is a bias-free 1x1 conv C_out + k -> C_out adding D_2 + ... + D_k - (k-1) R back into ``channel``
    (k = 2: rows C_out = D2, C_out + 1 = R). Same function as ``conv``.

    ``conv``: a Conv2d, grouped Conv2d or Linear, or its LayerView (``utils.model.layer_view``): a grouped conv's
    L' is a dense Conv2d (its rows zero outside their group), a Linear's L' and M are Linear layers."""
    view = as_view(conv)
    weight = view.weight
    c_out = view.out_channels
    D = state_dict["disentangled.weight"].to(weight)
    k = D.shape[0] - 1
    new = view.wide_layer(c_out + k)
    merge = view.merge_layer(c_out + k)
    with torch.no_grad():
        w = torch.cat([weight, D[1:k + 1]])
        w[channel] = D[0]
        set_weight(new, w)
        if view.bias is not None:
            bk = state_dict["disentangled.bias"].to(view.bias)
            b = torch.cat([view.bias, bk[1:k + 1]])
            b[channel] = bk[0]
            new.bias.copy_(b)
        m = torch.zeros(c_out, c_out + k, 1, 1, dtype=weight.dtype, device=weight.device)
        m[torch.arange(c_out), torch.arange(c_out)] = 1
        mw = state_dict["merged.weight"].flatten().to(m)
        m[channel, channel] = mw[0]
        for i in range(k):
            m[channel, c_out + i] = mw[i + 1]
        set_weight(merge, m)
    seq = nn.Sequential(new, merge)
    for prm in seq.parameters():
        prm.requires_grad_(False)
    return seq


def disentangled_model(model, layer_path, channel, state_dict):
    """A copy of ``model`` whose layer ``layer_path`` is replaced by ``disentangled_conv``."""
    new = copy.deepcopy(model)
    conv = new.get_submodule(layer_path)
    replace_module(new, layer_path, disentangled_conv(conv, channel, state_dict))
    return new


@contextlib.contextmanager
def disentangled_layer(model, layer_path, channel, state_dict):
    """``model`` itself with its layer ``layer_path`` replaced by ``disentangled_conv`` inside the block;
    the original layer is put back on exit. No copy of the model (``disentangled_model`` copies it)."""
    conv = model.get_submodule(layer_path)
    replace_module(model, layer_path, disentangled_conv(conv, channel, state_dict))
    try:
        yield model
    finally:
        replace_module(model, layer_path, conv)


def logits(model, images):
    """(N, K) float32 logits, no gradients."""
    with torch.no_grad():
        return model(images).float()


def network_check(model, layer_path, channel, state_dict, images, original_logits=None):
    """max |z' - z| and max |z| of the disentangled and original networks' logits on ``images``, plus z.

    The disentangled network is ``model`` with the layer swapped in place (``disentangled_layer``);
    ``original_logits``: z if already computed on the same images. Returns (diff, zmax, z).
    """
    z = logits(model, images) if original_logits is None else original_logits
    with disentangled_layer(model, layer_path, channel, state_dict) as dm:
        z2 = logits(dm, images)
    return (*logit_difference(z, z2), z)


def logit_difference(z, z2):
    """(max |z2 - z|, max |z|) of two networks' logits z, z2 (N, classes): what ``split.within_tolerance`` takes."""
    return float((z2 - z).abs().max()), float(z.abs().max())


def load_disentangled_model(model, weights=None, layer="last_conv", channel=None, checkpoint=None):
    """The disentangled network as a plain ``nn.Module`` (eval mode, frozen), for other tools (captum, a
    feature visualization of your own): the model flags of the stage scripts plus a published checkpoint.

    ``model``, ``weights``, ``layer``: as ``--model``, ``--weights``, ``--layer_of_interest``;
    ``channel``: the split channel c; ``checkpoint``: a ``…_unnormalized.pth`` path or its state dict.
    The layer becomes ``Sequential(L', M)``: ``net.get_submodule(layer)[0]`` outputs C_out + k maps, k read from
    the checkpoint (row c = D1, rows C_out .. C_out+k-2 = D2 .. Dk, row C_out+k-1 = R; k = 2: row C_out = D2,
    row C_out + 1 = R); the Sequential's output, and the logits, equal the original's.
    ``disentangle_channel.py --export_model`` writes this network's state dict (``…_f_best_model.pth``),
    which ``load_state_dict`` accepts on the returned module.

    ``checkpoint`` a dict {channel: checkpoint path or state dict} (int keys; ``channel`` is then not used): the
    whole-layer network with every one of those channels split at once
    (``utils.model.whole_layer.load_whole_layer_model``).
    """
    from utils.model import loading
    from utils.errors import UserError
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(c, int) for c in checkpoint):
        from utils.model.whole_layer import load_whole_layer_model
        return load_whole_layer_model(model, weights, layer, checkpoint)
    base, _ = loading.load_model(model, weights)
    path, conv = loading.resolve_layer(base, layer)
    if channel is None or not 0 <= channel < conv.out_channels:
        raise UserError(f"channel {channel}: layer {path} has channels 0..{conv.out_channels - 1}")
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        from utils.files import reading
        sd = reading.load_state_dict(checkpoint, "checkpoint", "pass a checkpoint that disentangle_channel.py wrote")
    else:
        sd = checkpoint
    problem = checkpoint_problem(sd, conv)
    if problem:
        raise UserError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the checkpoint'}: {problem} for "
                        f"layer {path}")
    return disentangled_model(base, path, channel, sd).eval()


def export_model(dmodel, model_spec, weights_id, layer_path, channel, checkpoint_path):
    """Write ``…_f_best_model.pth`` (``exported_state_dict``) and ``…_f_best_model.json`` saying how to rebuild
    the network ``dmodel`` (``disentangled_model``), beside the job's best checkpoint ``checkpoint_path``.
    Returns the two paths."""
    from utils.files import atomic
    conv, merge = dmodel.get_submodule(layer_path)  # L' has the layer's geometry, M its output channels
    c_out = out_units(merge)
    k = out_units(conv) - c_out
    rows = {"D1": channel, **{f"D{j}": c_out + j - 2 for j in range(2, k + 1)}, "R": c_out + k - 1}
    geometry = None if isinstance(conv, nn.Linear) else conv_geometry(conv)
    weights = exported_weights(weights_id)
    pth, js = names.exported_model(checkpoint_path)
    atomic.save_torch(pth, exported_state_dict(dmodel))
    atomic.write_json(js, {
        "model": model_spec, "weights": weights, "layer": layer_path, "channel": channel,
        "checkpoint": os.path.basename(checkpoint_path), "state_dict": os.path.basename(pth),
        "layer_replaced_by": [describe(conv, geometry), describe(merge, "kernel_size=(1, 1), bias=False")],
        "rows_of_first_conv": rows,
        "rebuild": (f"from utils.disentangle import load_disentangled_model; "
                    f"net = load_disentangled_model({model_spec!r}, {weights!r}, {layer_path!r}, {channel}, "
                    f"{os.path.basename(checkpoint_path)!r}); net.load_state_dict(torch.load({os.path.basename(pth)!r}))"),
        "without_this_code": (f"replace {layer_path} by torch.nn.Sequential of the two convs above, then "
                              f"load_state_dict(torch.load({os.path.basename(pth)!r}))")})
    return pth, js
