"""Channel attributions (activation x gradient) at a conv layer, and the patch sums of its input.

Gradients flow only from the logits down to the layer's output ``a``: the hook replaces ``a`` by a
detached leaf that requires grad, parameters are frozen and the images do not require grad, so no
autograd graph is built below the layer and nothing is back-propagated to the image.
"""
import torch
import torch.nn.functional as F


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
