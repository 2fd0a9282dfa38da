r"""One view of every layer the method splits: a unit is a weighted sum of input channels over positions.

    a[n, c, p] = b[c] + sum_{i in inputs(c)} sum_{k} W[c, i, k] x~[n, i, p, k]

- a Conv2d (groups = 1): every unit reads every input channel; p the output pixels, k the kernel taps;
- a grouped Conv2d (groups g > 1, C_in / g >= 2 input channels per group): unit c reads only the input
  channels of its group, inputs(c) = [j C_in/g, (j+1) C_in/g) with j = c // (C_out/g). The view's ``weight``
  is the dense equivalent (C_out, C_in, kh, kw), zero outside the unit's group, so that patch sums, ARVs,
  splits and filter maps are those of a plain conv: an input channel outside the group has W = 0, hence ARV 0,
  is no concept's source and stays in the residue with weight 0. A depthwise conv (one input channel per
  group) has nothing to split and is refused (``loading.resolve_layer``);
- an ``nn.Linear`` applied to (N, C), (N, T, C) or (N, H, W, C): the output features are the units, the
  tokens or pixels the positions, the weight (C_out, C_in) seen as (C_out, C_in, 1, 1), i.e. a 1x1 conv over
  the channel-first map (N, C, T, 1) or (N, C, H, W) (a (N, C) input is (N, C, 1, 1)).

``LayerView`` gives the stages what they read of the layer with a Conv2d's names (``weight``, ``bias``,
``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``), channel-first
taps (``channel_first``), the layer applied to a channel-first input (``__call__``) and the split's surgery
(``wide_layer``, ``merge_layer``): the stages do not branch on the layer's type. For a plain Conv2d every
attribute is the module's own (the same tensors), so the numbers are those of the conv itself.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("conv", "grouped", "linear")


def layer_kind(module):
    """'conv', 'grouped', 'depthwise', 'linear' or None (a layer the method cannot split)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv"
        return "depthwise" if module.in_channels // module.groups == 1 else "grouped"
    return None


def dense_weight(weight, groups):
    """A grouped conv's weight (C_out, C_in/g, kh, kw) as the dense (C_out, C_in, kh, kw) of the same function:
    row c holds its filter on the input channels of its group and zeros elsewhere."""
    c_out, per_in = weight.shape[:2]
    per_out = c_out // groups
    dense = weight.new_zeros((c_out, per_in * groups) + tuple(weight.shape[2:]))
    for j in range(groups):
        dense[j * per_out:(j + 1) * per_out, j * per_in:(j + 1) * per_in] = weight[j * per_out:(j + 1) * per_out]
    return dense


class LayerView:
    """A Conv2d, grouped Conv2d or Linear seen as a conv over channel-first maps (see the module docstring)."""

    def __init__(self, module):
        kind = layer_kind(module)
        if kind not in KINDS:
            raise ValueError(f"{type(module).__name__} is not a layer the method splits")
        self.module, self.kind = module, kind
        self._dense = (None, None)

    # --- what a Conv2d would say -------------------------------------------------------------------------
    @property
    def out_channels(self):
        return self.module.out_features if self.kind == "linear" else self.module.out_channels

    @property
    def in_channels(self):
        return self.module.in_features if self.kind == "linear" else self.module.in_channels

    @property
    def groups(self):
        return 1 if self.kind == "linear" else self.module.groups

    def _conv_attr(self, name, linear_value):
        return linear_value if self.kind == "linear" else getattr(self.module, name)

    kernel_size = property(lambda self: self._conv_attr("kernel_size", (1, 1)))
    stride = property(lambda self: self._conv_attr("stride", (1, 1)))
    padding = property(lambda self: self._conv_attr("padding", (0, 0)))
    dilation = property(lambda self: self._conv_attr("dilation", (1, 1)))
    padding_mode = property(lambda self: self._conv_attr("padding_mode", "zeros"))

    @property
    def bias(self):
        return self.module.bias

    @property
    def weight(self):
        """(C_out, C_in, kh, kw): the conv's own weight; a grouped conv's dense equivalent (computed once per
        weight tensor and version); a Linear's (C_out, C_in) as (C_out, C_in, 1, 1)."""
        w = self.module.weight
        if self.kind == "conv":
            return w
        if self.kind == "linear":
            return w[:, :, None, None]
        key = (w.device, w.dtype, w.data_ptr(), w._version)
        if self._dense[0] != key:
            with torch.no_grad():
                self._dense = (key, dense_weight(w.detach(), self.module.groups))
        return self._dense[1]

    def unit_inputs(self, c):
        """The input channels unit ``c`` reads: range(C_in) (conv, Linear) or its group's."""
        if self.kind != "grouped":
            return range(self.in_channels)
        g = self.module.groups
        per_in, per_out = self.in_channels // g, self.out_channels // g
        j = c // per_out
        return range(j * per_in, (j + 1) * per_in)

    # --- taps ----------------------------------------------------------------------------------------------
    def channel_first(self, t):
        """The layer's input or output as it flows in the model -> (N, C, *positions), 4-D.

        Conv: unchanged. Linear: (N, C) -> (N, C, 1, 1), (N, T, C) -> (N, C, T, 1), (N, H, W, C) -> (N, C, H, W)
        (views, no copies; a gradient flows through them)."""
        if self.kind != "linear":
            return t
        if t.dim() == 2:
            return t[:, :, None, None]
        if t.dim() == 3:
            return t.transpose(1, 2)[..., None]
        if t.dim() == 4:
            return t.permute(0, 3, 1, 2)
        raise ValueError(f"a Linear layer applied to a {t.dim()}-D input: only (N, C), (N, T, C) and (N, H, W, C) "
                         f"are supported")

    def __call__(self, x):
        """The layer on a channel-first input x (N, C_in, H, W) -> (N, C_out, H', W')."""
        if self.kind == "linear":
            return F.linear(x.movedim(1, -1), self.module.weight, self.module.bias).movedim(-1, 1)
        return self.module(x)

    # --- surgery -------------------------------------------------------------------------------------------
    def wide_layer(self, rows, dtype_too=False):
        """An empty layer of this kind with ``rows`` output units and this layer's geometry, on its device (and
        dtype with ``dtype_too``). A grouped conv becomes a dense Conv2d (groups 1): its rows are dense filters."""
        m = self.module
        if self.kind == "linear":
            new = nn.Linear(m.in_features, rows, bias=m.bias is not None)
        elif dtype_too:
            new = nn.Conv2d(m.in_channels, rows, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None, padding_mode=m.padding_mode)
        else:
            new = nn.Conv2d(m.in_channels, rows, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None)
        return new.to(m.weight) if dtype_too else new.to(m.weight.device)

    def merge_layer(self, rows):
        """An empty bias-free layer from ``rows`` units back to C_out: a 1x1 Conv2d, or a Linear for a Linear."""
        if self.kind == "linear":
            new = nn.Linear(rows, self.out_channels, bias=False)
        else:
            new = nn.Conv2d(rows, self.out_channels, 1, bias=False)
        return new.to(self.module.weight.device)


def as_view(layer):
    """``layer`` itself when it is a LayerView, else the LayerView of the module."""
    return layer if isinstance(layer, LayerView) else LayerView(layer)


def set_weight(module, weight):
    """Copy a (rows, C_in, kh, kw) weight into a Conv2d or Linear made by ``wide_layer`` / ``merge_layer``."""
    module.weight.copy_(weight.reshape(module.weight.shape))


def out_units(module):
    """The output units of a Conv2d or Linear."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def describe(module, geometry):
    """How an exported network's record names a replacement layer: ``Conv2d(in, out, <geometry>)`` or
    ``Linear(in, out, bias=...)``."""
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}, {module.out_features}, bias={module.bias is not None})"
    return f"Conv2d({module.in_channels}, {module.out_channels}, {geometry})"
