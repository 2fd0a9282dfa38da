"""Splitting one channel's filter into one filter per concept and a residue, exactly.

k >= 2 concepts with ARVs v_1 .. v_k (mean ARV of channel c over each concept's training images). For one
rho, input channel i of the layer is a source of concept j for the FIRST j with rho*v_j[i] > max_{l!=j} v_l[i];
inputs of no concept form the residue set N. D_j = W[c] with the sources of every other concept zeroed (it
keeps its own sources and N), R = W[c] on N only, so sum_j D_j - (k-1) R = W[c] and the network is unchanged
(with a bias, every D_j and R carry b[c]). For k = 2 this is the published rule: source of concept 1 if
rho*v1[i] > v2[i], else of concept 2 if rho*v2[i] > v1[i]; D1 + D2 - R = W[c].

The checkpoint of one rho holds [D_1, ..., D_k, R] and the merge [1, ..., 1, -(k-1)]; the split's maps are
these filters applied to the layer's input with the layer's geometry. Exactness (the maps against the layer's
own output, the logits against the original network's) is judged to TOLERANCE relative, of max(1, max |value|).
"""
import torch
import torch.nn.functional as F

TOLERANCE = 1e-4  # relative, of max(1, largest |value|): the split's maps and the logits must agree to it
RHOS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
        0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]


def split_sources_k(arvs, rho):
    """Input channels assigned to each of k concepts: the first j with rho*v_j[i] > max_{l!=j} v_l[i].

    arvs: (k, C_in) ARVs v_1 .. v_k, k >= 2 -> (k, C_in) bool, at most one True per input channel.
    """
    k = arvs.shape[0]
    src = torch.zeros(arvs.shape, dtype=torch.bool, device=arvs.device)
    taken = torch.zeros(arvs.shape[1:], dtype=torch.bool, device=arvs.device)
    for j in range(k):
        others = torch.cat([arvs[:j], arvs[j + 1:]]).amax(dim=0)
        src[j] = ~taken & (rho * arvs[j] > others)
        taken |= src[j]
    return src


def split_filter_k(weight_c, arvs, rho):
    """[D_1, ..., D_k, R] for one rho. weight_c: (C_in, kh, kw); arvs: (k, C_in) -> (k+1, C_in, kh, kw).

    D_j keeps its own sources and the residue N (the inputs of no concept); R keeps N only."""
    src = split_sources_k(arvs, rho)
    k = src.shape[0]
    out = []
    for j in range(k):
        other = torch.cat([src[:j], src[j + 1:]]).any(dim=0)
        out.append(weight_c * (~other).to(weight_c.dtype)[:, None, None])
    out.append(weight_c * (~src.any(dim=0)).to(weight_c.dtype)[:, None, None])
    return torch.stack(out)


def split_filters_k(weight_c, arvs, rhos=RHOS):
    """split_filter_k for every rho: (len(rhos), k+1, C_in, kh, kw)."""
    return torch.stack([split_filter_k(weight_c, arvs, r) for r in rhos])


def split_filter(weight_c, v1, v2, rho):
    """[D1, D2, R] for one rho (two concepts). weight_c: (C_in, kh, kw); v1, v2: (C_in,) -> (3, C_in, kh, kw)."""
    return split_filter_k(weight_c, torch.stack([v1, v2]), rho)


def merge_weights(k, dtype=torch.float32):
    """The merge of a k-way split: [1, ..., 1, -(k-1)] as (1, k+1, 1, 1) (published [1, 1, -1] for k = 2)."""
    return torch.tensor([1.0] * k + [float(-(k - 1))], dtype=dtype).view(1, k + 1, 1, 1)


def checkpoint_state_dict(filters, bias_c=None):
    """Published checkpoint layout for k = filters.shape[0] - 1 concepts: disentangled.weight (k+1, C_in, kh, kw)
    = [D_1, ..., D_k, R], disentangled.bias (k+1,) = b[c] repeated when the layer has a bias, merged.weight
    (1, k+1, 1, 1) = [1, ..., 1, -(k-1)] (k = 2: [D1, D2, R], [1, 1, -1], the published checkpoint)."""
    n = filters.shape[0]
    sd = {"disentangled.weight": filters.detach().clone().cpu()}
    if bias_c is not None:
        sd["disentangled.bias"] = bias_c.detach().reshape(1).repeat(n).clone().cpu()
    sd["merged.weight"] = merge_weights(n - 1, filters.dtype)
    return sd


def filter_maps(x, conv, filters, bias=None):
    """Maps of extra filters on the layer's input, with the layer's geometry.

    x: (N, C_in, H, W); filters: (F, C_in, kh, kw); bias: (F,) or None -> (N, F, H', W').
    """
    return F.conv2d(x, filters.to(x), None if bias is None else bias.to(x),
                    conv.stride, conv.padding, conv.dilation)


def positive_mass(maps):
    """pos(X) = sum_{h,w} max(X, 0): (N, F, H, W) -> (N, F)."""
    return maps.clamp_min(0).sum(dim=(2, 3))


def merged_map_difference(maps, a_c):
    """max |sum_j D_j - (k-1) R - a_c| per image, over rho and positions.

    maps: (N, R, k+1, H, W) maps of [D_1, ..., D_k, R] for R values of rho; a_c: (N, H, W) the channel's own map.
    Returns (N,).
    """
    k = maps.shape[2] - 1
    merged = maps[:, :, 0]
    for j in range(1, k):
        merged = merged + maps[:, :, j]
    merged = merged - (maps[:, :, k] if k == 2 else (k - 1) * maps[:, :, k])
    return (merged - a_c[:, None]).abs().amax(dim=(1, 2, 3))


def within_tolerance(diff, scale):
    """diff <= TOLERANCE * max(1, scale)."""
    return diff <= TOLERANCE * max(1.0, scale)
