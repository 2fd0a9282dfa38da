"""Channel attributions (activation x gradient) at a conv layer, and the patch sums of its input.

Gradients flow only from the logits down to the layer's output ``a``: the hook replaces ``a`` by a
detached leaf that requires grad, parameters are frozen and the images do not require grad, so no
autograd graph is built below the layer and nothing is back-propagated to the image.
"""
import contextlib

import torch
import torch.nn.functional as F


class _StopForward(Exception):
    pass


class LayerTap:
    """Forward hook on ``layer`` that records its input ``x`` and output ``a``.

    ``leaf=True``: ``a`` is replaced by a detached copy requiring grad, the start of the only graph.
    ``stop=True``: the forward pass is aborted right after the layer (only ``x``/``a`` are wanted).
    """

    def __init__(self, layer, leaf=False, stop=False):
        self.layer, self.leaf, self.stop = layer, leaf, stop
        self.x = self.a = None

    def _hook(self, module, inputs, output):
        self.x = inputs[0].detach()
        if self.leaf:
            self.a = output.detach().float().requires_grad_(True)
            output = self.a.clone()  # a non-leaf copy: an in-place op after the layer (ReLU(inplace=True)) is fine
        else:
            self.a = output
        if self.stop:
            raise _StopForward
        return output

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def layer_input(model, layer, images):
    """Run ``model`` up to ``layer`` only. Returns its input x: (N, C_in, H_in, W_in)."""
    return layer_input_output(model, layer, images)[0]


def layer_input_output(model, layer, images):
    """Run ``model`` up to ``layer`` only (no gradients). Returns its input x (N, C_in, H_in, W_in) and
    its output a (N, C_out, H', W'), as the layer computed it."""
    with torch.no_grad(), LayerTap(layer, stop=True) as tap:
        try:
            model(images)
        except _StopForward:
            pass
    if tap.x is None:
        raise RuntimeError("the layer of interest was not reached in the forward pass")
    return tap.x, tap.a.detach()


def logits_and_layer_grad(model, layer, images, labels, autocast_dtype=None):
    """One forward pass and the head-only backward of the labels' logits.

    images: (N, 3, H, W); labels: (N,) long.
    Returns x (N, C_in, H_in, W_in) the layer's input, a (N, C_out, H', W') its output (float32),
    g = d z_{y_n} / d a_n (same shape as a), logits (N, K) float32.
    """
    dev_type = images.device.type
    ctx = (torch.autocast(dev_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.enable_grad(), LayerTap(layer, leaf=True) as tap, ctx:
        logits = model(images)
    if tap.a is None:
        raise RuntimeError("the layer of interest was not reached in the forward pass")
    logits = logits.float()
    (g,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), tap.a)
    return tap.x, tap.a.detach(), g, logits.detach()


def channel_attribution(a, g):
    """A[n, c] = sum_{h,w} a[n,c,h,w] * g[n,c,h,w].  a, g: (N, C, H, W) -> (N, C)."""
    return (a * g).sum(dim=(2, 3))


def positive_attribution(a, g):
    """sum_{h,w} max(a*g, 0): (N, C, H, W) -> (N, C); the numerator of the relative attribution."""
    return (a * g).clamp_min(0).sum(dim=(2, 3))


def relative_attribution(a, g, channel):
    """rel[n] = pos(a*g)[n, channel] / sum_c pos(a*g)[n, c].  a, g: (N, C, H, W) -> (N,)."""
    return relative_of_positive(positive_attribution(a, g), channel)


def relative_of_positive(pos, channel):
    """``relative_attribution`` from pos = positive_attribution(a, g) (N, C), shared by many channels -> (N,)."""
    return pos[:, channel] / pos.sum(dim=1).clamp_min(torch.finfo(pos.dtype).tiny)


def important_channels(A, tau):
    """Boolean (N, C): channel c is important for image n if A[n,c] >= tau * sum_c' max(A[n,c'], 0).

    A: (N, C) channel attributions (any float dtype; the sum is taken in float32).
    """
    A = A.float()
    return A >= tau * A.clamp_min(0).sum(dim=1, keepdim=True)


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def patch_sums(x, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """P[n,k,i,j] = sum over output positions (h,w) of x~[n, k, h*s_h + i*d_h, w*s_w + j*d_w].

    x~ is x zero-padded by ``padding``. x: (N, C_in, H, W) -> (N, C_in, kh, kw), float32 with the
    spatial sums accumulated in float64. The layer's output summed over space is then
    sum_{h,w} a[n,c,h,w] = sum_{k,i,j} W[c,k,i,j] P[n,k,i,j] (+ bias * H_out * W_out).
    """
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    xd = x.double()
    if kh == kw == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0):
        return xd.sum(dim=(2, 3)).float()[:, :, None, None]
    xp = F.pad(xd, (pw, pw, ph, ph))
    out = x.new_empty((n, c, kh, kw), dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            out[:, :, i, j] = xp[:, :, r0:r0 + (ho - 1) * sh + 1:sh, c0:c0 + (wo - 1) * sw + 1:sw].sum(dim=(2, 3))
    return out.float()


def conv_patch_sums(x, conv):
    """``patch_sums`` with the geometry of the Conv2d ``conv``."""
    return patch_sums(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
