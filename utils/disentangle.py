"""Stage 3: split one channel's filter into two concept filters and a residue, exactly.

For an input channel k of the layer: k is a source of concept 1 if rho*v1[k] > v2[k], else a source
of concept 2 if rho*v2[k] > v1[k], else neither. D1 = W[c] without concept-2 sources, D2 = W[c]
without concept-1 sources, R = W[c] without either; D1 + D2 - R = W[c], so the network is unchanged.

Exactness is checked twice, almost for free: the scoring pass computes D1, D2, R of every rho on the
layer's input anyway, so D1 + D2 - R is compared with the layer's own output a[:, c] on every image it
sees (max over images, positions and rho); and the full original and disentangled networks' logits are
compared on a handful of images. Both must agree to TOLERANCE relative (of max(1, max |value|)).
"""
import contextlib
import copy
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attribution import layer_input_output
from .models import replace_module

TOLERANCE = 1e-4  # relative, of max(1, largest |value|): the split's maps and the logits must agree to it
RHOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
        0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
EPS = 1e-5


def split_sources(v1, v2, rho):
    """Input channels assigned to each concept. v1, v2: (C_in,) ARVs -> (src1, src2) bool (C_in,)."""
    src1 = rho * v1 > v2
    src2 = ~src1 & (rho * v2 > v1)
    return src1, src2


def split_filter(weight_c, v1, v2, rho):
    """[D1, D2, R] for one rho. weight_c: (C_in, kh, kw); v1, v2: (C_in,) -> (3, C_in, kh, kw)."""
    src1, src2 = split_sources(v1, v2, rho)
    keep1 = (~src2).to(weight_c.dtype)[:, None, None]
    keep2 = (~src1).to(weight_c.dtype)[:, None, None]
    return torch.stack([weight_c * keep1, weight_c * keep2, weight_c * keep1 * keep2])


def split_filters(weight_c, v1, v2, rhos=RHOS):
    """split_filter for every rho: (len(rhos), 3, C_in, kh, kw)."""
    return torch.stack([split_filter(weight_c, v1, v2, r) for r in rhos])


def checkpoint_state_dict(filters, bias_c=None):
    """Published checkpoint: disentangled.weight (3, C_in, kh, kw) = [D1, D2, R],
    disentangled.bias (3,) = b[c] three times when the layer has a bias, merged.weight (1, 3, 1, 1) = [1, 1, -1]."""
    sd = {"disentangled.weight": filters.detach().clone().cpu()}
    if bias_c is not None:
        sd["disentangled.bias"] = bias_c.detach().reshape(1).repeat(3).clone().cpu()
    sd["merged.weight"] = torch.tensor([1.0, 1.0, -1.0], dtype=filters.dtype).view(1, 3, 1, 1)
    return sd


def checkpoint_name(tag, channel, classes1, classes2, rho):
    """Published file name; ``rho`` a float from RHOS, or 'best'."""
    f = "_best" if rho == "best" else str(rho)
    return f"{tag}_channel{channel}_classes1{classes1}_classes2{classes2}_f{f}_unnormalized.pth"


def disentangled_conv(conv, channel, state_dict):
    """``Sequential(L', M)`` replacing ``conv``: L' has C_out + 2 output channels (row ``channel`` = D1,
    row C_out = D2, row C_out + 1 = R), M is a bias-free 1x1 conv C_out + 2 -> C_out adding D2 - R
    back into ``channel``. Same function as ``conv``."""
    c_out = conv.out_channels
    D = state_dict["disentangled.weight"].to(conv.weight)
    new = nn.Conv2d(conv.in_channels, c_out + 2, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None).to(conv.weight.device)
    merge = nn.Conv2d(c_out + 2, c_out, 1, bias=False).to(conv.weight.device)
    with torch.no_grad():
        w = torch.cat([conv.weight, D[1:3]])
        w[channel] = D[0]
        new.weight.copy_(w)
        if conv.bias is not None:
            b3 = state_dict["disentangled.bias"].to(conv.bias)
            b = torch.cat([conv.bias, b3[1:3]])
            b[channel] = b3[0]
            new.bias.copy_(b)
        m = torch.zeros(c_out, c_out + 2, 1, 1, dtype=conv.weight.dtype, device=conv.weight.device)
        m[torch.arange(c_out), torch.arange(c_out)] = 1
        mw = state_dict["merged.weight"].flatten().to(m)
        m[channel, channel] = mw[0]
        m[channel, c_out] = mw[1]
        m[channel, c_out + 1] = mw[2]
        merge.weight.copy_(m)
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


def filter_maps(x, conv, filters, bias=None):
    """Maps of extra filters on the layer's input, with the layer's geometry.

    x: (N, C_in, H, W); filters: (F, C_in, kh, kw); bias: (F,) or None -> (N, F, H', W').
    """
    return F.conv2d(x, filters.to(x), None if bias is None else bias.to(x),
                    conv.stride, conv.padding, conv.dilation)


def positive_mass(maps):
    """pos(X) = sum_{h,w} max(X, 0): (N, F, H, W) -> (N, F)."""
    return maps.clamp_min(0).sum(dim=(2, 3))


def separation_terms(pos, concept):
    """Per-image ratios of the best-rho score.

    pos: (N, R, 3) positive masses of [D1, D2, R] for R values of rho; concept: (N,) in {1, 2}.
    Returns (N, R): pos(D1)/(pos(D2)+1e-5) for concept-1 images, pos(D2)/(pos(D1)+1e-5) for concept 2.
    """
    q1 = pos[..., 0] / (pos[..., 1] + EPS)
    q2 = pos[..., 1] / (pos[..., 0] + EPS)
    return torch.where((concept == 1)[:, None], q1, q2)


def rho_scores(sum_q1, n1, sum_q2, n2):
    """score(rho) = mean q1 + mean q2 from running sums: (R,) tensors and image counts -> (R,)."""
    return sum_q1 / max(n1, 1) + sum_q2 / max(n2, 1)


def best_rho_index(scores):
    """Index of the first maximal score (float64 comparison)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return int(torch.nonzero(s == s.max()).flatten()[0])


def concept_of_labels(labels, classes1, classes2):
    """(N,) labels -> (N,) concept ids: 1 for classes1, 2 for classes2, 0 otherwise."""
    c = torch.zeros_like(labels)
    c[torch.isin(labels, torch.as_tensor(classes1, device=labels.device))] = 1
    c[torch.isin(labels, torch.as_tensor(classes2, device=labels.device))] = 2
    return c


@dataclass
class Split:
    """One channel's split filters for every rho and its two concepts: what the scoring pass evaluates.

    filters: (R, 3, C_in, kh, kw) = split_filters(...); bias_c: scalar tensor or None; channel: the
    layer's channel they split (None: no comparison with the layer's output).
    """
    channel: object
    filters: torch.Tensor
    bias_c: object
    classes1: list
    classes2: list


@dataclass
class SplitScores:
    """What the scoring pass finds for one Split."""
    scores: torch.Tensor  # (R,) float64 best-rho scores
    images1: int          # concept-1 images scored
    images2: int          # concept-2 images scored
    max_map_diff: float   # max |D1 + D2 - R - a[c]| over those images, their positions and every rho
    max_abs_map: float    # max |a[c]| over the same images (the scale of the relative tolerance)


def merged_map_difference(maps, a_c):
    """max |D1 + D2 - R - a_c| per image, over rho and positions.

    maps: (N, R, 3, H, W) maps of [D1, D2, R] for R values of rho; a_c: (N, H, W) the channel's own map.
    Returns (N,).
    """
    merged = maps[:, :, 0] + maps[:, :, 1] - maps[:, :, 2]
    return (merged - a_c[:, None]).abs().amax(dim=(1, 2, 3))


def score_splits(model, conv, splits, loader, device, progress=None):
    """Best-rho scores of every rho of every Split from one pass over ``loader``, and the exactness of
    the split on every image scored.

    Each batch runs the model up to the layer only; the hook gives its input x and output a. For each
    Split with images in the batch, its 3R filters run as one convolution on x, and D1 + D2 - R of every
    rho is compared with a[:, c]. Images of neither concept of a Split do not count for it; a batch no
    Split needs is not run. Returns a list of SplitScores (one per Split). Sums stay on the device
    (no synchronisation per batch).
    """
    banks = []
    for s in splits:
        nr = s.filters.shape[0]
        flat = s.filters.reshape((nr * 3,) + tuple(s.filters.shape[2:])).to(device)
        bias = None if s.bias_c is None else s.bias_c.reshape(1).repeat(nr * 3).to(device)
        banks.append((flat, bias, nr))
    acc = [{"sum1": torch.zeros(nr, dtype=torch.float64, device=device),
            "sum2": torch.zeros(nr, dtype=torch.float64, device=device), "n1": 0, "n2": 0,
            "diff": torch.zeros((), device=device), "amax": torch.zeros((), device=device)}
           for (_, _, nr) in banks]
    for images, labels in (progress(loader) if progress else loader):
        concepts = [concept_of_labels(labels, s.classes1, s.classes2) for s in splits]  # on the CPU
        needed = [bool((k > 0).any()) for k in concepts]
        if not any(needed):
            continue
        x, a = layer_input_output(model, conv, images.to(device, non_blocking=True))
        x, n = x.float(), len(images)
        for s, (flat, bias, nr), concept, need, ac in zip(splits, banks, concepts, needed, acc):
            if not need:
                continue
            maps = filter_maps(x, conv, flat, bias)
            pos = positive_mass(maps).reshape(n, nr, 3)
            cd = concept.to(device, non_blocking=True)
            terms = separation_terms(pos, cd).double()
            for k in (1, 2):
                ac[f"sum{k}"] += torch.where((cd == k)[:, None], terms, 0).sum(dim=0)
                ac[f"n{k}"] += int((concept == k).sum())
            if s.channel is not None:
                a_c = a[:, s.channel].float()
                inside = cd > 0
                d = merged_map_difference(maps.reshape((n, nr, 3) + tuple(maps.shape[2:])), a_c)
                ac["diff"] = torch.maximum(ac["diff"], torch.where(inside, d, 0).amax())
                ac["amax"] = torch.maximum(ac["amax"], torch.where(inside, a_c.abs().amax(dim=(1, 2)), 0).amax())
    return [SplitScores(rho_scores(ac["sum1"].cpu(), ac["n1"], ac["sum2"].cpu(), ac["n2"]), ac["n1"], ac["n2"],
                        float(ac["diff"]), float(ac["amax"])) for ac in acc]


def score_all_rhos(model, conv, all_filters, bias_c, loader, classes1, classes2, device, progress=None):
    """Best-rho scores of every rho from one pass over the concepts' images (``score_splits`` of one Split).

    all_filters: (R, 3, C_in, kh, kw) = split_filters(...); bias_c: scalar tensor or None.
    All 3R filters run as one convolution on the layer's input. Returns (R,) float64 scores.
    """
    return score_splits(model, conv, [Split(None, all_filters, bias_c, classes1, classes2)], loader, device,
                        progress)[0].scores


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
    return float((z2 - z).abs().max()), float(z.abs().max()), z


def within_tolerance(diff, scale):
    """diff <= TOLERANCE * max(1, scale)."""
    return diff <= TOLERANCE * max(1.0, scale)


def max_logit_difference(model, disentangled, images):
    """max |z' - z| and max |z| of the two networks' logits on ``images`` (float32)."""
    z, z2 = logits(model, images), logits(disentangled, images)
    return float((z2 - z).abs().max()), float(z.abs().max())


def load_disentangled_model(model, weights=None, layer="last_conv", channel=None, checkpoint=None):
    """The disentangled network as a plain ``nn.Module`` (eval mode, frozen), for other tools (captum, a
    feature visualization of your own): the model flags of the stage scripts plus a published checkpoint.

    ``model``, ``weights``, ``layer``: as ``--model``, ``--weights``, ``--layer_of_interest``;
    ``channel``: the split channel c; ``checkpoint``: a ``…_unnormalized.pth`` path or its state dict.
    The layer becomes ``Sequential(L', M)``: ``net.get_submodule(layer)[0]`` outputs C_out + 2 maps (row c = D1,
    row C_out = D2, row C_out + 1 = R); the Sequential's output, and the logits, equal the original's.
    ``disentangle_channel.py --export_model`` writes this network's state dict (``…_f_best_model.pth``),
    which ``load_state_dict`` accepts on the returned module.
    """
    from . import models
    from .cli import UserError
    base, _ = models.load_model(model, weights)
    path, conv = models.resolve_layer(base, layer)
    if channel is None or not 0 <= channel < conv.out_channels:
        raise UserError(f"channel {channel}: layer {path} has channels 0..{conv.out_channels - 1}")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, (str, bytes)) \
        or hasattr(checkpoint, "__fspath__") else checkpoint
    d = sd.get("disentangled.weight") if isinstance(sd, dict) else None
    if d is None or tuple(d.shape) != (3,) + tuple(conv.weight.shape[1:]):
        raise UserError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the checkpoint'}: "
                        f"disentangled.weight has shape {None if d is None else tuple(d.shape)}, expected "
                        f"{(3,) + tuple(conv.weight.shape[1:])} for layer {path}")
    return disentangled_model(base, path, channel, sd).eval()


def exported_state_dict(dmodel):
    """The disentangled network's state dict as plain, contiguous CPU tensors (nothing shared, no views)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in dmodel.state_dict().items()}


def export_model(base, dmodel, model_spec, weights_id, layer_path, conv, channel, checkpoint_path):
    """Write ``{base}_f_best_model.pth`` (``exported_state_dict``) and ``{base}_f_best_model.json`` saying how
    to rebuild the network. Returns the two paths."""
    from . import fileio
    c_out = conv.out_channels
    geometry = (f"kernel_size={tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={tuple(conv.padding)}, "
                f"dilation={tuple(conv.dilation)}, bias={conv.bias is not None}")
    weights = None if weights_id == "factory" else weights_id
    pth, js = base + "_f_best_model.pth", base + "_f_best_model.json"
    fileio.save_torch(pth, exported_state_dict(dmodel))
    fileio.write_json(js, {
        "model": model_spec, "weights": weights, "layer": layer_path, "channel": channel,
        "checkpoint": os.path.basename(checkpoint_path), "state_dict": os.path.basename(pth),
        "layer_replaced_by": [f"Conv2d({conv.in_channels}, {c_out + 2}, {geometry})",
                              f"Conv2d({c_out + 2}, {c_out}, kernel_size=(1, 1), bias=False)"],
        "rows_of_first_conv": {"D1": channel, "D2": c_out, "R": c_out + 1},
        "rebuild": (f"from utils.disentangle import load_disentangled_model; "
                    f"net = load_disentangled_model({model_spec!r}, {weights!r}, {layer_path!r}, {channel}, "
                    f"{os.path.basename(checkpoint_path)!r}); net.load_state_dict(torch.load({os.path.basename(pth)!r}))"),
        "without_this_code": (f"replace {layer_path} by torch.nn.Sequential of the two convs above, then "
                              f"load_state_dict(torch.load({os.path.basename(pth)!r}))")})
    return pth, js
