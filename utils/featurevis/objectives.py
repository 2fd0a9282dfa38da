r"""What a feature visualization maximizes: the targets of a checkpoint, all from the layer's input x.

    T_orig(img) = mean_{h,w} max(conv(x, W[c]) + b[c], 0)      (L's output channel c)
    T_j(img)    = mean_{h,w} max(conv(x, D_j)  + b[c], 0)      (j = 1..k; the residue R is not shown)
x is the layer's input on the image (one forward pass up to L, nothing above it runs); the checkpoint holds
[D_1, ..., D_k, R] as ``disentangled.weight``. Pure functions on tensors; ``Targets`` is the objective of a
group of targets as lucent's objectives are: a small callable on the layer's input.
"""
import torch

from utils.method.split import filter_maps


def target_filters(conv, channel, state_dict):
    """The filters whose maps are visualized: [W[c], D_1, ..., D_k] from a checkpoint [D_1, ..., D_k, R].

    Returns (weights (T, C_in, kh, kw), bias (T,) or None, names ['original', 'D1', ..., 'Dk']), T = k + 1.
    Raises ValueError when the checkpoint does not fit the layer.
    """
    w_c = conv.weight[channel].detach().cpu()
    d = state_dict.get("disentangled.weight")
    if d is None or d.dim() != 4 or d.shape[0] < 3 or tuple(d.shape[1:]) != tuple(w_c.shape):
        raise ValueError(f"the checkpoint's disentangled.weight has shape {None if d is None else tuple(d.shape)}; "
                         f"expected (k+1, {', '.join(map(str, w_c.shape))}) for this layer")
    k = d.shape[0] - 1
    weights = torch.cat([w_c[None], d[:k].to(w_c)])
    bias = None
    if conv.bias is not None:
        b = state_dict.get("disentangled.bias")
        b_c = conv.bias[channel].detach().cpu().reshape(1)
        bias = torch.cat([b_c, (b[:k] if b is not None else b_c.repeat(k)).to(b_c)])
    return weights, bias, ["original"] + [f"D{j + 1}" for j in range(k)]


def target_maps(x, conv, weights, bias):
    """max(conv(x, weights) + bias, 0) with the layer's geometry: (N, C_in, H, W) -> (N, T, H', W')."""
    return filter_maps(x, conv, weights, bias).clamp_min(0)


def target_values(x, conv, weights, bias):
    """T_t = mean_{h,w} max(conv(x, weights[t]) + bias[t], 0): (N, C_in, H, W) -> (N, T)."""
    return target_maps(x, conv, weights, bias).mean(dim=(2, 3))


class Targets:
    """The objective of a group of targets: called on the layer's input x (N, C_in, H, W), the values
    (N, T) of ``target_values`` for the filters ``weights`` (T, C_in, kh, kw) and ``bias`` (T,) or None of
    ``layer`` (whose geometry the maps take)."""

    def __init__(self, layer, weights, bias=None):
        self.layer, self.weights, self.bias = layer, weights, bias

    @property
    def count(self):
        """T, the number of targets."""
        return self.weights.shape[0]

    def on(self, device):
        """These targets with float32 weights and bias on ``device``."""
        return Targets(self.layer, self.weights.to(device, torch.float32),
                       None if self.bias is None else self.bias.to(device, torch.float32))

    def __call__(self, x):
        return target_values(x, self.layer, self.weights, self.bias)


def values_and_peaks(maps):
    """Each target's value and the position of its map's maximum (first on ties), per image.
    maps: (N, T, H', W') -> (values (N, T), positions (N, T, 2) as (h, w) int64)."""
    width = maps.shape[-1]
    flat = maps.flatten(2).argmax(dim=2)
    return maps.mean(dim=(2, 3)), torch.stack([flat // width, flat % width], dim=2)
