"""Which layers of a model the method splits, which one is the default, and why the others are refused.

One forward pass of a blank image (``crop`` x ``crop``, default 224) with hooks on every Conv2d and Linear
tells, per layer, whether the forward calls it as a module (nn.MultiheadAttention and Swin's attention use
their Linear's weights directly: such a layer is never reached) and the shape of its input (a Linear over
(N, C), (N, T, C) or (N, H, W, C)). The pass is made once per process for each architecture and input size: a
model in eval mode is known by its class, its modules' names and classes and its parameters' and buffers'
shapes (``architecture``), so the same factory built again (each stage, each call of a notebook) is not
surveyed again; a model in training mode (whose BatchNorm statistics a forward pass would change) is surveyed
every time, as it always was.

The default layer (``--layer_of_interest last_conv``) is the last layer on the main path that the method
splits and whose channels are features:
- candidates, in module order: every supported Conv2d, and every Linear applied over positions (tokens or
  pixels; a classifier head on (N, C) is not a default, though it can be chosen);
- the last candidate is dropped when nothing runs after it and its channels are the class scores (as
  SqueezeNet's classifier conv, whose output is pooled into the logits);
- a Linear inside an MLP (its parent's name holds ``mlp``: ViT, Swin, MaxViT) gives way to the MLP's first
  Linear, whose units are the MLP's hidden neurons.
So a CNN keeps its last Conv2d, ConvNeXt gets its last block's second pointwise Linear, ViT, Swin and MaxViT
the last block's first MLP Linear.
"""
import weakref

import torch
import torch.nn as nn

from utils.model.layer_view import KINDS, layer_kind

DEFAULT_CROP = 224
_SURVEYS = weakref.WeakKeyDictionary()  # model -> {crop: survey}
_BY_ARCHITECTURE = {}  # (architecture, crop) -> survey, models in eval mode


def architecture(model):
    """What the survey of a model in eval mode depends on: its class, and each module's path and class with the
    shapes of its own parameters and buffers (not their values), and the device type of its first parameter."""
    p = next(model.parameters(), None)
    return (type(model), None if p is None else p.device.type,
            tuple((name, type(m), tuple((k, tuple(t.shape)) for k, t in m.named_parameters(recurse=False)),
                   tuple((k, tuple(t.shape)) for k, t in m.named_buffers(recurse=False) if t is not None))
                  for name, m in model.named_modules()))


def survey(model, crop=None):
    """{path: input dims} of every Conv2d and Linear the forward pass of a blank (1, 3, crop, crop) image calls
    as a module, in call order, and the logits' size, as ``(calls, num_logits)``; None when the model does not
    run on that input."""
    crop = crop or DEFAULT_CROP
    per_model = _SURVEYS.setdefault(model, {})
    if crop in per_model:
        return per_model[crop]
    key = None if model.training else (architecture(model), crop)
    if key is not None and key in _BY_ARCHITECTURE:
        per_model[crop] = _BY_ARCHITECTURE[key]
        return per_model[crop]
    calls, hooks = {}, []
    def hook(name):
        def record(module, inputs, output):  # returns None: the output is left as it is
            calls.setdefault(name, inputs[0].dim())
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            out = model(torch.zeros(1, 3, crop, crop, device=None if p is None else p.device))
        result = (calls, int(out.shape[-1]) if torch.is_tensor(out) and out.dim() == 2 else None)
    except Exception:
        result = None
    finally:
        for h in hooks:
            h.remove()
    per_model[crop] = result
    if key is not None:
        _BY_ARCHITECTURE[key] = result
    return result


def static_refusal(module):
    """Why the method cannot split ``module`` whatever the input, or None."""
    kind = layer_kind(module)
    if kind is None:
        return f"is a {type(module).__name__}, not a Conv2d or Linear"
    if kind == "depthwise":
        return (f"is a depthwise conv (grouped, groups={module.groups}, one input channel per output channel): "
                f"each channel reads one input channel, so there is nothing to split")
    if kind != "linear":
        if module.padding_mode != "zeros":
            return f"padding_mode '{module.padding_mode}' is not supported (only zero padding)"
        if isinstance(module.padding, str):
            return f"string padding '{module.padding}' is not supported"
    return None


def run_refusal(path, module, surveyed):
    """Why a Linear that is statically fine cannot be used on this model's forward pass, or None."""
    if not isinstance(module, nn.Linear) or surveyed is None:
        return None
    calls = surveyed[0]
    if path not in calls:
        return ("is never called as a module in the forward pass (its parent uses its weight directly, as "
                "nn.MultiheadAttention's out_proj does), so its output cannot be tapped")
    if calls[path] > 4:
        return f"is applied to a {calls[path]}-D input; only (N, C), (N, T, C) and (N, H, W, C) are supported"
    return None


def layers(model):
    """[(path, module)] of every Conv2d and Linear, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def refusal(model, path, module, crop=None):
    """Why ``module`` (at ``path``) cannot be the layer of interest, or None. A depthwise conv's line names the
    nearest supported layer after it."""
    why = static_refusal(module)
    if why and layer_kind(module) == "depthwise":
        nxt = next_supported(model, path, crop)
        return why + (f"; the nearest supported layer after it is {nxt}" if nxt else "")
    if why:
        return why
    return run_refusal(path, module, survey(model, crop) if isinstance(module, nn.Linear) else None)


def supported(model, crop=None):
    """[(path, module)] of the layers the method splits, in module order (a Linear only when the forward pass
    calls it, if that pass runs at all)."""
    all_layers = layers(model)
    surveyed = survey(model, crop) if any(isinstance(m, nn.Linear) for _, m in all_layers) else None
    return [(n, m) for n, m in all_layers if static_refusal(m) is None and run_refusal(n, m, surveyed) is None]


def next_supported(model, path, crop=None):
    names = [n for n, _ in supported(model, crop)]
    order = [n for n, _ in layers(model)]
    after = [n for n in names if order.index(n) > order.index(path)]
    return after[0] if after else None


def default_layer(model, crop=None):
    """The default layer's path (see the module docstring), or None."""
    all_layers = layers(model)
    has_linear = any(isinstance(m, nn.Linear) for _, m in all_layers)
    surveyed = survey(model, crop) if has_linear else None
    calls = surveyed[0] if surveyed else {}
    cands = [(n, m) for n, m in all_layers if static_refusal(m) is None and layer_kind(m) in KINDS
             and (not isinstance(m, nn.Linear) or calls.get(n, 0) >= 3)]
    if not cands:
        return None
    name, module = cands[-1]
    num_logits = surveyed[1] if surveyed else getattr(model, "num_classes", None)
    later = [n for n, _ in all_layers if (n in calls if surveyed else True)]
    if (isinstance(module, nn.Conv2d) and len(cands) > 1 and later and later[-1] == name
            and module.out_channels == num_logits):
        name, module = cands[-2]
    parent = name.rpartition(".")[0]
    if isinstance(module, nn.Linear) and "mlp" in parent.rpartition(".")[2].lower():
        name = next(n for n, m in cands if n.rpartition(".")[0] == parent)
    return name


def shape_of(module):
    return tuple(module.weight.shape)


def listing(model, crop=None):
    """[(path, weight shape, note)] of every Conv2d and Linear in module order: note '' (supported), the reason
    it is refused, and the default layer marked."""
    default = default_layer(model, crop)
    rows = []
    for name, m in layers(model):
        kind = layer_kind(m)
        why = ("one input channel per output channel, nothing to split" if kind == "depthwise"
               else refusal(model, name, m, crop))
        if why and why.startswith("is never called"):
            why = "never called as a module (its parent uses its weight directly)"
        what = {"conv": "conv", "grouped": f"grouped conv, groups {getattr(m, 'groups', 1)}",
                "linear": "Linear", "depthwise": f"depthwise conv, groups {getattr(m, 'groups', 1)}"}[kind]
        note = f"{what}: not supported: {why}" if why else what
        if name == default:
            note += "   <- last_conv (the default)"
        rows.append((name, shape_of(m), note))
    return rows
