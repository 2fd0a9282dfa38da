"""Taps on a layer: what goes into and out of it during a forward pass, and a forward that stops there.

Every pass of the stages reads a layer's input x (N, C_in, H, W) and output a (N, C_out, H', W') through
``LayerTap`` (a forward hook), channel-first whatever the layer (``utils.model.layer_view``: a Linear's
(N, T, C) is seen as (N, C, T, 1)); passes that need no logits stop the forward right after the layer (``stop=True``),
and the feature visualization, which differentiates through the layer's input, stops right before it
(``before=True``). Gradients of ``logits_and_layer_grad`` flow only from the logits down to the layer's output:
the hook replaces ``a`` by a detached leaf that requires grad, so no graph is built below the layer.
"""
import contextlib

import torch

from utils.model.layer_view import as_view


class StopForward(Exception):
    pass


class LayerTap:
    """Forward hook on ``layer`` that records its input ``x`` and output ``a``.

    ``leaf=True``: ``a`` is replaced by a detached copy requiring grad, the start of the only graph.
    ``stop=True``: the forward pass is aborted right after the layer (only ``x``/``a`` are wanted).
    ``before=True``: the forward pass is aborted right before the layer, and ``x`` keeps its graph (a function of
    the images, for a gradient through it); ``a`` stays None.

    ``layer``: a module the method splits or its ``LayerView``; ``x`` and ``a`` are channel-first, and with
    ``leaf=True`` ``a_leaf`` is the leaf itself in the layer's own layout (what gradients are taken against).
    """

    def __init__(self, layer, leaf=False, stop=False, before=False):
        self.view = as_view(layer)
        self.layer, self.leaf, self.stop, self.before = self.view.module, leaf, stop, before
        self.x = self.a = self.a_leaf = None

    def _pre_hook(self, module, inputs):
        self.x = self.view.channel_first(inputs[0])
        raise StopForward

    def _hook(self, module, inputs, output):
        self.x = self.view.channel_first(inputs[0].detach())
        if self.leaf:
            self.a_leaf = output.detach().float().requires_grad_(True)
            self.a = self.view.channel_first(self.a_leaf)
            output = self.a_leaf.clone()  # a non-leaf copy: an in-place op after the layer (ReLU(inplace=True)) is fine
        else:
            self.a = self.view.channel_first(output)
        if self.stop:
            raise StopForward
        return output

    def __enter__(self):
        self.handle = (self.layer.register_forward_pre_hook(self._pre_hook) if self.before
                       else self.layer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def _run_to(model, tap, images):
    """Run ``model`` on ``images`` until ``tap`` stops it; a layer the forward never reaches is an error."""
    try:
        model(images)
    except StopForward:
        pass
    if tap.x is None:
        raise RuntimeError("the layer of interest was not reached in the forward pass")


def layer_input_with_grad(model, layer, images):
    """Run ``model`` up to ``layer`` only, keeping the graph: its input x (N, C_in, H, W) as a function of
    ``images`` (the feature visualization differentiates through it; ``layer_input`` does not)."""
    with LayerTap(layer, before=True) as tap:
        _run_to(model, tap, images)
    return tap.x


def layer_input(model, layer, images):
    """Run ``model`` up to ``layer``, the layer itself not run (no gradients). Returns its input x:
    (N, C_in, H_in, W_in)."""
    with torch.no_grad():
        return layer_input_with_grad(model, layer, images)


def layer_input_output(model, layer, images):
    """Run ``model`` up to ``layer`` only (no gradients). Returns its input x (N, C_in, H_in, W_in) and
    its output a (N, C_out, H', W'), as the layer computed it."""
    with torch.no_grad(), LayerTap(layer, stop=True) as tap:
        _run_to(model, tap, images)
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
    (g,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), tap.a_leaf)
    return tap.x, tap.a.detach(), tap.view.channel_first(g), logits.detach()
