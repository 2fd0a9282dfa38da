"""Model and layer loading: torchvision names or user factories, weights by name or file, layer paths."""
import difflib
import hashlib
import importlib
import os
import re
import sys

import torch
import torch.nn as nn
import torchvision

from utils.errors import UserError


INIT_SEED = 0  # torch's seed while a model is built without weights (--weights none, a factory's own)


def model_tag(model_spec):
    """File-name-safe name of a model spec: ``resnet50`` stays, ``pkg.mod:make`` becomes ``pkg_mod_make``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", model_spec).strip("_")


def default_layer(model, crop=None):
    """Module path of the model's default layer (``--layer_of_interest last_conv``), or None: the last layer on
    the main path that the method splits and whose channels are features (``layer_survey.default_layer``: the
    last Conv2d of a CNN, not a classifier conv whose channels are the class scores; ConvNeXt's last pointwise
    Linear; the last MLP's first Linear of a transformer). ``crop``: the input size for the one forward pass that
    tells which Linear layers run over positions (default 224)."""
    from utils.model import layer_survey
    return layer_survey.default_layer(model, crop)


def file_tag(model, model_spec, layer_path, crop=None):
    """What names a run's files: the model tag for its last conv (the default layer: the published names,
    ``resnet50`` for layer4.2.conv3), else the tag and the layer (``resnet18_layer3.1.conv2``), so that
    the files of two layers of one model never collide."""
    tag = model_tag(model_spec)
    if layer_path == default_layer(model, crop):
        return tag
    return f"{tag}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', layer_path).strip('_')}"


def _state_dict_num_classes(state):
    """Output size of the last 2-D weight (the classifier) in a state dict, or None."""
    mats = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    return int(mats[-1].shape[0]) if mats else None


def _build_architecture(model_spec, num_classes=None):
    if ":" in model_spec:
        module_name, _, attr = model_spec.partition(":")
        if os.getcwd() not in sys.path:  # a user's own module in the working directory
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--model {model_spec}: cannot import module '{module_name}' ({e})")
        factory = getattr(module, attr, None)
        if factory is None:
            raise UserError(f"--model {model_spec}: module '{module_name}' has no '{attr}'")
        model = factory()
        if not isinstance(model, nn.Module):
            raise UserError(f"--model {model_spec}: the factory returned {type(model).__name__}, not an nn.Module")
        return model
    names = torchvision.models.list_models(module=torchvision.models)
    if model_spec not in names:
        hint = did_you_mean(model_spec, names, f"torchvision's are {', '.join(sorted(names)[:8])}, ...")
        raise UserError(f"--model {model_spec}: neither a torchvision classification model nor "
                        f"package.module:factory ({hint})")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if model_spec in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    return torchvision.models.get_model(model_spec, weights=None, **kwargs)


def did_you_mean(word, choices, otherwise):
    """'did you mean X?' for the entries of ``choices`` close to ``word`` (difflib), else ``otherwise``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(close)}?" if close else otherwise


def _looks_like_file(weights):
    return os.path.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or os.path.isfile(weights)


def _torchvision_weights(model_spec, weights):
    """Resolve a weights name for a torchvision model to a WeightsEnum member, or None."""
    enum = torchvision.models.get_model_weights(model_spec)
    if weights is None:
        weights = "IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else "DEFAULT"
    name = weights.split(".")[-1]
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise UserError(f"--weights {weights}: no such weights for {model_spec}; choose from "
                        f"{', '.join(enum.__members__)}, or pass the path of a state-dict file")


def _load_state_dict_file(model_spec, path):
    if not os.path.isfile(path):
        raise UserError(f"--weights {path}: file not found; pass an existing state-dict file "
                        f"or a torchvision weights name")
    from utils.files import reading
    try:
        state = reading.load_state_dict(path, "state dict", "pass a file saved with torch.save(model.state_dict(), "
                                                           "path) or a torchvision weights name")
    except reading.Damaged as e:
        raise UserError(f"--weights {e}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    k = _state_dict_num_classes(state) if ":" not in model_spec else None
    model = _build_architecture(model_spec, num_classes=k if k not in (None, 1000) else None)
    problem = state_dict_misfit(model.state_dict(), state)
    if problem:
        raise UserError(f"--weights {path}: does not fit --model {model_spec}: {problem}")
    model.load_state_dict(state, strict=False)
    return model


IGNORED_KEYS = ("aux1.", "aux2.", "AuxLogits.")  # auxiliary heads of googlenet / inception_v3, built without them


def state_dict_misfit(expected, state, first=3):
    """Why the state dict ``state`` does not fit a model whose own state dict is ``expected``, in one phrase
    (tensors the model has and the file lacks, tensors the file has and the model lacks, tensors of other shapes:
    the first ``first`` of each, with both shapes), or None when it fits (``load_state_dict`` would take it)."""
    def shape(t):
        return "(" + ", ".join(str(int(d)) for d in getattr(t, "shape", ())) + ")"

    def some(items):
        return ", ".join(items[:first]) + (f" and {len(items) - first} more" if len(items) > first else "")
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected and not key.startswith(IGNORED_KEYS)]
    mismatched = [f"{key} {shape(state[key])} in the file, {shape(expected[key])} in the model" for key in state
                  if key in expected and tuple(getattr(state[key], "shape", ())) != tuple(expected[key].shape)]
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} tensor{'s' if len(mismatched) > 1 else ''} of another shape ({some(mismatched)})")
    if missing:
        parts.append(f"{len(missing)} missing from the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model ({some(unexpected)})")
    return "; ".join(parts) or None


def _seeded_build(model_spec, check_repeatable=False):
    """The architecture built under torch's seed INIT_SEED (the caller's random state is left as it was), so that
    every process gets the same initial weights. ``check_repeatable`` (stage 1, which makes the store): a
    factory whose weights still differ between two builds (it draws them from another generator) is refused,
    since its store could never be read again."""
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            return _build_architecture(model_spec)
    model = build()
    if check_repeatable and ":" in model_spec and weights_sha256(model) != weights_sha256(build()):
        raise UserError(f"--model {model_spec}: the factory draws new random weights on every call (two builds "
                        f"differ), so a later stage cannot rebuild the model of the store; save its state dict "
                        f"once (torch.save(model.state_dict(), 'w.pth')) and pass --weights w.pth")
    return model


def load_model(model_spec, weights=None, check_repeatable=False):
    """Build the model in eval mode with frozen parameters.

    ``weights``: None (torchvision: IMAGENET1K_V1 where it exists, else DEFAULT; a factory: its own, built
    under torch's seed INIT_SEED), 'none' (as built, under the same seed), a torchvision weights name, or the path of a state-dict file (a torchvision
    architecture takes its number of classes from the file).
    ``check_repeatable``: build a factory's own weights twice and refuse them if they differ (see _seeded_build).
    Returns ``(model, weights_id)`` where ``weights_id`` names what was loaded.
    """
    factory = ":" in model_spec
    if weights is not None and weights.lower() == "none":
        model, weights_id = _seeded_build(model_spec, check_repeatable), "none"
    elif weights is not None and _looks_like_file(weights):
        model, weights_id = _load_state_dict_file(model_spec, weights), os.path.abspath(weights)
    elif factory:
        if weights is not None:
            raise UserError(f"--weights {weights}: with --model {model_spec} pass a state-dict file path or 'none'")
        model, weights_id = _seeded_build(model_spec, check_repeatable), "factory"
    else:
        _build_architecture(model_spec)  # validates the name with a clear message
        member = _torchvision_weights(model_spec, weights)
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(member.url))
        try:
            model = torchvision.models.get_model(model_spec, weights=member)
        except Exception as e:
            raise UserError(f"cannot load torchvision weights {model_spec} {member.name} "
                            f"({type(e).__name__}): without internet, copy {os.path.basename(member.url)} "
                            f"to {cache}, or pass --weights /path/to/state_dict.pth")
        weights_id = f"{type(member).__name__}.{member.name}"
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    from utils.finite import refuse_nonfinite_weights
    refuse_nonfinite_weights(model, f"--model {model_spec}, weights {weights_id}")
    return model, weights_id


def weights_sha256(model):
    """SHA-256 over the model's state dict (names, shapes and bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def conv_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model, layer_path, crop=None):
    """Return ``(path, LayerView)`` for a module path or ``last_conv`` (the default layer, ``default_layer``).

    Refused with one line: no such module, a module that is neither a Conv2d nor a Linear, a depthwise conv
    (nothing to split; the nearest supported layer after it is named), a conv with another padding mode or
    string padding, a Linear the forward pass never calls as a module (``crop``: the input size of that pass)."""
    from utils.model import layer_survey
    from utils.model.layer_view import LayerView
    if layer_path == "last_conv":
        layer_path = default_layer(model, crop)
        if layer_path is None:
            raise UserError("--layer_of_interest last_conv: the model has no Conv2d or Linear layer the method "
                            "splits (--list_layers shows them)")
    try:
        module = model.get_submodule(layer_path)
    except AttributeError:
        convs = [n for n, _ in conv_layers(model)]
        close = difflib.get_close_matches(layer_path, convs, n=3, cutoff=0.6)
        hint = (f" (did you mean {' or '.join(close)}?)" if close
                else f" (last convs: {', '.join(convs[-3:])}; --list_layers shows them all)" if convs else "")
        raise UserError(f"--layer_of_interest {layer_path}: no such module in the model{hint}")
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise UserError(f"--layer_of_interest {layer_path}: is a {type(module).__name__}, not a Conv2d or Linear")
    why = layer_survey.refusal(model, layer_path, module, crop)
    if why:
        raise UserError(f"--layer_of_interest {layer_path}: {why}")
    return layer_path, LayerView(module)


def check_input_size(model, model_spec, crop):
    """Refuse (one line) a --crop the model cannot take: a model with a fixed input size (torchvision's ViT:
    ``image_size``) and any other crop, or a torchvision model whose forward pass fails at that size (MaxViT,
    built for 224 x 224)."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and crop is not None and crop != size:
        raise UserError(f"--crop {crop}: --model {model_spec} takes only {size} x {size} inputs (its position "
                        f"embedding is fixed); pass --crop {size} (and a --resize of at least {size})")
    from utils.model import layer_survey
    if ":" not in model_spec and crop is not None and layer_survey.survey(model, crop) is None:
        raise UserError(f"--crop {crop}: --model {model_spec} does not run on {crop} x {crop} inputs (torchvision "
                        f"builds it for 224 x 224); pass --crop 224")


def layer_geometry(conv):
    """JSON-friendly description of the layer: shapes, stride, padding, dilation, bias (a Conv2d); a grouped
    conv adds ``groups``; a Linear is ``{"linear": true, "weight_shape": [out, in], "bias": ...}``."""
    from utils.model.layer_view import as_view
    view = as_view(conv)
    if view.kind == "linear":
        return {"linear": True, "weight_shape": list(view.module.weight.shape), "bias": view.bias is not None}
    geometry = {
        "weight_shape": list(view.module.weight.shape),
        "stride": list(view.stride),
        "padding": list(view.padding),
        "dilation": list(view.dilation),
        "bias": view.bias is not None,
    }
    if view.kind == "grouped":
        geometry["groups"] = view.groups
    return geometry


def check_nr_channels(conv, nr_channels, layer_path):
    if nr_channels is not None and nr_channels != conv.out_channels:
        raise UserError(f"--nr_channels_in_layer_of_interest {nr_channels} disagrees with layer "
                        f"{layer_path}, which has {conv.out_channels} output channels")


def replace_module(model, path, new):
    """Replace the submodule at dotted ``path`` by ``new`` (in place)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def batchnorm_after(model, conv, example):
    """The ``nn.BatchNorm2d`` that takes ``conv``'s output as its input, or None.

    Found by running ``model`` once on ``example`` (a small (N, 3, H, W) batch) with hooks: the BatchNorm
    whose input tensor *is* the conv's output tensor (identity, not equality, and unchanged since: an in-place op between them, e.g. ``relu_``, bumps its
    version counter), as in ResNet's conv3 -> bn3. Otherwise no BatchNorm follows the layer directly.
    """
    seen, found = {}, []

    def on_conv(module, inputs, output):
        seen["out"], seen["version"] = output, output._version

    def on_bn(module, inputs):  # the same tensor, and not changed in place since the conv wrote it
        if "out" in seen and inputs[0] is seen["out"] and inputs[0]._version == seen["version"]:
            found.append(module)

    from utils.model.layer_view import as_view
    hooks = [as_view(conv).module.register_forward_hook(on_conv)]
    hooks += [m.register_forward_pre_hook(on_bn) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def batchnorm_affine(bn):
    """Per-channel scale and shift of an eval-mode BatchNorm, BN(a) = scale * a + shift: two (C,) float64 tensors."""
    var = bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + bn.eps)
    return scale, bias - scale * bn.running_mean.double()


def blank(crop):
    """A blank (1, 3, crop, crop) image: forwards of it find the BatchNorm after a layer and the layer's H' x W'."""
    return torch.zeros(1, 3, crop, crop)


def layer_signs_and_positions(model, conv, example):
    """Per-channel sign of "strong" and the layer's number of output positions, from forwards on ``example``.

    example: a small (n, 3, H, W) batch of the data's input size (no image is needed: zeros do).
    Returns (signs, positions, bn_name): signs (C_out,) int64, -1 where the BatchNorm that directly takes
    the layer's output (``batchnorm_after``) has a negative scale for the channel, else +1;
    positions = H' * W'; bn_name the BatchNorm's module path or None.
    """
    from utils.model.tap import layer_input_output
    _, a = layer_input_output(model, conv, example)
    positions = int(a.shape[-2] * a.shape[-1])
    bn = batchnorm_after(model, conv, example)
    signs = torch.ones(conv.out_channels, dtype=torch.int64)
    if bn is None:
        return signs, positions, None
    scale, _ = batchnorm_affine(bn)
    signs[scale < 0] = -1
    name = next(n for n, m in model.named_modules() if m is bn)
    return signs, positions, name
