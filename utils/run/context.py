"""What every stage script sets up from its flags: device, model, layer, transform, dataset, store fingerprint.

Stages 2-4 read the store's manifest first: a flag not given (model, weights, layer, data folder, transform)
is the store's, a given one must agree with it (one line otherwise), so that after stage 1 only the store
and the stage's own flags are needed. A manifest is data: a torchvision model name is taken from it (an entry
of torchvision's registry), a model factory (``module:function``, code) only from ``--model``, and a
``--model`` that names another model than the store's is refused before any weights are loaded. Stage 4's
published ``--model_dir STORE/models_disentangled`` finds the store in STORE.

``setup`` leaves the parsed flags as they are: what it resolved (model, weights, layer, data folder, transform,
the store's folder and manifest) is ``ctx.spec``, a frozen ``Spec`` from which ``utils.run.settings_of_flags``
builds the stages' settings.
"""
import os
import shlex
from dataclasses import dataclass

import torch.nn as nn

from utils.data import classmap
from utils.run import cli
from utils.run import device as device_choice
from utils.data import folders
from utils.model import loading
from utils.files import names, store


@dataclass(frozen=True)
class Spec:
    """What a stage runs on once its flags and the store's manifest are read: a flag not given is the store's,
    else the default. ``store_dir``: --store_dir / --model_dir (STORE/models_disentangled: STORE; stage 1: the
    flag); ``store_folder``: the store of this model and layer in it and ``manifest`` its manifest (stages 2-4;
    None for stage 1 and where the folder holds no store of them)."""
    model: str = None
    weights: str = None
    layer: str = None
    data_dir: str = None
    transform: folders.Transform = folders.DEFAULT_TRANSFORM
    store_dir: str = None
    store_folder: str = None
    manifest: dict = None


@dataclass
class Context:
    device: object
    model: nn.Module
    model_spec: str
    tag: str
    weights_id: str
    weights_sha256: str
    layer_path: str
    conv: object                     # the layer of interest as a utils.model.layer_view.LayerView
    dataset: object = None
    fingerprint: dict = None
    name: str = None                 # the model (and, for a layer other than the last conv, layer) in file names
    transform: folders.Transform = folders.DEFAULT_TRANSFORM
    class_outputs: list = None       # output index of each class folder, None when it is the folder's own index
    class_error: Exception = None    # setup(defer_class_error=True): why the class folders do not fit the outputs
    spec: Spec = None                # what setup resolved from the flags and the store (``Spec``)


TRANSFORM_FLAGS = ("resize", "crop", "mean", "std")


def transform_of(args, recorded=None):
    """The Transform of the flags; a flag not given is ``recorded``'s (a store's), else the default. A given flag
    that differs from ``recorded`` raises UserError (one line)."""
    base = recorded or folders.DEFAULT_TRANSFORM
    values = {}
    for name in TRANSFORM_FLAGS:
        given = getattr(args, name, None)
        value = getattr(base, name)
        if given is not None:
            given = tuple(float(v) for v in given) if isinstance(given, (list, tuple)) else int(given)
            if recorded is not None and given != value:
                shown = " ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value
                raise cli.UserError(f"--{name} {' '.join(f'{v:g}' for v in given) if isinstance(given, tuple) else given}"
                                    f": the store was made with --{name} {shown}; leave the flag out (later stages "
                                    f"take the store's) or run stage 1 into another --store_dir")
            value = given
        values[name] = value
    return folders.check_transform(folders.Transform(**values))


def weights_flag(weights_id):
    """The --weights value that loads what a manifest's ``weights`` names (None: a factory's own)."""
    if weights_id in (None, "factory"):
        return None
    return weights_id  # 'none', a file path, or 'Enum.NAME' (loading.load_model takes the part after the dot)


def describe_store(m):
    return f"--model {shown(m.get('model'))} --layer_of_interest {shown(m.get('layer'))}"


def shown(value, limit=120):
    """A value read from a file, safe to print in one line: shell-quoted when printable, else ``repr`` (control
    characters, newlines and right-to-left marks escaped), cut at ``limit`` characters."""
    text = str(value)
    text = shlex.quote(text) if text.isprintable() else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def is_factory(model_spec):
    """A ``module:function`` model spec (code to import), as opposed to a torchvision name."""
    return ":" in str(model_spec or "")


def refuse_store_factory(model_spec, where):
    """A manifest's model factory is code: it is imported only when the command line names it (``--model``)."""
    raise cli.UserError(f"{where} was made with the model factory --model {shown(model_spec)}: a store's "
                        f"manifest is data and its code is never imported on its word; pass --model "
                        f"{shown(model_spec)} yourself if you trust that module")


def checkpoints_parent(folder):
    """The store folder of ``STORE/models_disentangled`` (the published stage-4 ``--model_dir``): STORE when the
    folder itself holds no store and STORE does, else ``folder`` unchanged."""
    if not folder:
        return folder
    trimmed = os.path.normpath(folder)
    parent = os.path.dirname(trimmed)
    if (os.path.basename(trimmed) == names.CHECKPOINTS_DIR and not store.find_stores(folder)
            and store.find_stores(parent)):
        return parent
    return folder


def store_of_flags(given, store_dir, flag):
    """(manifest, None, values) of the one store in ``store_dir`` that fits the model and layer flags given.

    given: {"model", "weights", "layer", "data_dir"} as the flags give them (None: not given; data_dir "": the
    stage has no such flag); values: a copy with the flags not given (weights, layer, data folder; the model when
    it is a torchvision name) filled from the store. (None, None, values) when the folder holds no store and every
    flag is given (the stage then says the store is missing); (None, message, values) when it holds stores of the
    model but none of the given layer (raised once the layer is known to exist). Raises UserError when the choice
    is ambiguous (several stores and no layer named), when --model names another model than every store's
    (before any weights are loaded), and when the store's model is a factory that --model does not name (a
    manifest's code is never imported)."""
    values = dict(given)
    model, layer = values["model"], values["layer"]
    found = store.find_stores(store_dir)
    where = f"the store in {flag} {store_dir}"
    if model is not None and found and not any(m.get("model") == model for _, m in found):
        models = sorted({str(m.get("model")) for _, m in found})
        leave = "" if any(is_factory(m) for m in models) else "leave --model out or "
        raise cli.UserError(f"--model {shown(model)}: {flag} {store_dir} holds stores of --model "
                            + " and ".join(shown(m) for m in models)
                            + f" only; {leave}pass the store's (or run stage 1 with this --model into another "
                              "--store_dir)")
    fits = [(f, m) for f, m in found if model is None or m.get("model") == model]
    if layer not in (None, "last_conv"):
        fits = [(f, m) for f, m in fits if m.get("layer") == layer]
    elif layer == "last_conv" and len(fits) > 1:  # the default layer, named: the store named without a layer
        plain = [(f, m) for f, m in fits if os.path.basename(f) == os.path.basename(
            store.store_folder(store_dir, loading.model_tag(m.get("model", ""))))]
        fits = plain or fits
    if len(fits) > 1:
        raise cli.UserError(f"{flag} {store_dir} holds {len(fits)} stores that fit ("
                            + "; ".join(describe_store(m) for _, m in fits)
                            + "): pass --layer_of_interest (and --model) to choose one")
    if not fits:
        if found and (model is not None or layer is not None):
            named = " ".join(f"--{k} {shown(v)}" for k, v in (("model", model), ("layer_of_interest", layer))
                             if v is not None)
            missing = (f"{flag} {store_dir} holds no store made with {named} (it holds: "
                       + "; ".join(describe_store(m) for _, m in found)
                       + "): leave the flags out or run stage 1 with them first")
            # what the stores of the model agree on, so that the model is built and a bad layer named as such
            mine = [m for _, m in found if model is None or m.get("model") == model]
            if len({m.get("model") for m in mine}) == 1 and (model is not None
                                                              or not is_factory(mine[0].get("model"))):
                fill(values, mine, where)
            if model is None:
                raise cli.UserError(missing)
            return None, missing, values
        if model is None or values["data_dir"] is None:
            raise cli.UserError(f"no store in {flag} {store_dir}: run get_importances_for_classes.py with this "
                                f"--store_dir first (or pass --model, --weights, --layer_of_interest and "
                                f"--data_dir)")
        return None, None, values
    fill(values, [fits[0][1]], where, layer=True)
    return fits[0][1], None, values


def fill(values, manifests, where, layer=False):
    """Set the entries of ``values`` (``store_of_flags``'s) not given to what every manifest of ``manifests`` says
    (the layer only with ``layer``). A model factory is never taken from a manifest (``refuse_store_factory``); a
    torchvision name is (it names an entry of torchvision's registry, not code)."""
    def agreed(key):
        found = {str(m.get(key)) for m in manifests}
        return manifests[0].get(key) if len(found) == 1 else None
    if values["model"] is None:
        if is_factory(agreed("model")):
            refuse_store_factory(agreed("model"), where)
        values["model"] = agreed("model")
    if values["weights"] is None and agreed("weights") is not None:
        values["weights"] = weights_flag(agreed("weights"))
    if layer and values["layer"] is None:
        values["layer"] = agreed("layer")
    if values["data_dir"] is None:
        values["data_dir"] = agreed("data_dir")


def given_flags(args):
    """{"model", "weights", "layer", "data_dir"} as the parsed flags give them (data_dir "": no such flag)."""
    return {"model": args.model, "weights": args.weights, "layer": args.layer_of_interest,
            "data_dir": getattr(args, "data_dir", "")}


def setup(args, split="train", need_data=True, store_flag=None, defer_class_error=False):
    """The Context of the shared flags (the dataset of ``split`` when ``need_data``); ``args`` is left as it is:
    what the flags and the store resolve is ``ctx.spec`` (``Spec``).

    ``store_flag``: for stages 2-4, the attribute naming the store's folder ('store_dir' or 'model_dir'): flags
    not given are taken from its manifest. Stage 1 (None) uses the defaults: resnet50, last_conv, the paper's
    transform. ``defer_class_error``: class folders that do not fit the model's outputs are left in
    ``ctx.class_error`` (stage 1 first says whether the store folder holds a store of other settings).
    """
    given = given_flags(args)
    if store_flag:
        store_dir = checkpoints_parent(getattr(args, store_flag))
        manifest, missing, values = store_of_flags(given, store_dir, "--" + store_flag)
    else:
        store_dir, manifest, missing, values = getattr(args, "store_dir", None), None, None, given
        if need_data and given["data_dir"]:  # stage 1: both splits' class folders, before any work
            folders.check_split_classes(given["data_dir"])
    model_spec, layer = values["model"] or "resnet50", values["layer"] or "last_conv"
    data_dir = None if values["data_dir"] == "" else values["data_dir"]
    recorded = None if manifest is None else folders.Transform.from_record(manifest.get("input_transform"))
    transform = transform_of(args, recorded)
    device = device_choice.select_device(args.device, args.gpu)
    # stage 1 (no store to read) makes sure that a later stage can build the same weights again
    model, weights_id = loading.load_model(model_spec, values["weights"], check_repeatable=store_flag is None)
    loading.check_input_size(model, model_spec, transform.crop)
    layer_path, conv = loading.resolve_layer(model, layer, transform.crop)
    if missing:  # the layer exists, but the store folder has no store of it
        raise cli.UserError(missing)
    loading.check_nr_channels(conv, args.nr_channels_in_layer_of_interest, layer_path)
    if need_data and data_dir is None:
        raise cli.UserError("--data_dir is required (--help lists the flags)")
    if args.batch_size < 1:
        raise cli.UserError("--batch_size must be at least 1")
    tag = loading.model_tag(model_spec)
    name = loading.file_tag(model, model_spec, layer_path, transform.crop)
    ctx = Context(device=device, model=model, model_spec=model_spec, tag=tag,
                  weights_id=weights_id, weights_sha256=loading.weights_sha256(model),
                  layer_path=layer_path, conv=conv, name=name, transform=transform,
                  spec=Spec(model=model_spec, weights=values["weights"], layer=layer_path, data_dir=data_dir,
                            transform=transform, store_dir=store_dir, manifest=manifest,
                            store_folder=store.find_folder(store_dir, tag, name, layer_path) if store_flag else None))
    if need_data:
        ctx.dataset = folders.image_folder(data_dir, split, transform=folders.eval_transform(transform))
        how = fill_class_outputs(ctx, manifest, getattr(args, "class_index_map", None), defer_class_error)
        ctx.fingerprint = store.fingerprint(model_spec, weights_id, ctx.weights_sha256, layer_path,
                                            loading.layer_geometry(conv), folders.dataset_summary(ctx.dataset),
                                            transform.describe())
        if ctx.class_outputs is not None:
            ctx.fingerprint["class_outputs"] = ctx.class_outputs
            ctx.fingerprint["class_outputs_from"] = how
    return ctx


def fill_class_outputs(ctx, manifest, index_map, defer_class_error):
    """Set ``ctx.class_outputs``, the model output of each class folder of ``ctx.dataset``: the store's mapping
    when the folders are the store's (a --class_index_map that disagrees is refused), else ``classmap``'s (an
    error left in ``ctx.class_error`` with ``defer_class_error``). Another dataset than the store's is left to
    the store's own message. Returns how the mapping was made (the manifest's ``class_outputs_from``)."""
    model, crop = ctx.model, ctx.transform.crop
    if manifest is not None and manifest.get("classes") == list(ctx.dataset.classes):
        ctx.class_outputs, how = manifest.get("class_outputs"), manifest.get("class_outputs_from", "folder order")
        if index_map is not None and classmap.class_outputs(ctx.dataset.classes, classmap.num_outputs(model, crop),
                                                            index_map)[0] != ctx.class_outputs:
            raise cli.UserError(f"--class_index_map {index_map}: the store maps the class folders to other "
                                f"outputs ({how}); leave the flag out (the store's mapping is used)")
        return how
    if manifest is None:
        try:
            ctx.class_outputs, how = classmap.class_outputs(ctx.dataset.classes, classmap.num_outputs(model, crop),
                                                            index_map)
            return how
        except cli.UserError as e:
            if not defer_class_error:
                raise
            ctx.class_error = e
    return None


def list_layers(args):
    """--list_layers: the model's Conv2d layers with their weight shapes (the default layer marked). Without
    --model: the model of the stores in --store_dir / --model_dir when they are all of one model, else resnet50."""
    spec, weights = args.model, args.weights
    if spec is None:
        folder = getattr(args, "store_dir", None) or getattr(args, "model_dir", None)
        found = [m for _, m in store.find_stores(checkpoints_parent(folder))]
        if found and len({m.get("model") for m in found}) == 1:
            spec = found[0]["model"]
            if is_factory(spec):
                refuse_store_factory(spec, f"the store in {folder}")
            if weights is None and len({str(m.get("weights")) for m in found}) == 1:
                weights = weights_flag(found[0].get("weights"))
    spec = spec or "resnet50"
    if weights is None and ":" not in spec:
        weights = "none"  # the shapes do not depend on the weights: nothing to download
    model, _ = loading.load_model(spec, weights)
    from utils.model import layer_survey
    crop = getattr(args, "crop", None)
    rows = layer_survey.listing(model, crop)
    if not rows:
        raise cli.UserError(f"--model {spec}: the model has no Conv2d or Linear layer")
    width = max(len(n) for n, _, _ in rows)
    shape_width = max(len(str(s)) for _, s, _ in rows)
    print(f"Conv2d and Linear layers of {spec} (--layer_of_interest NAME; weight shape = out, in[, kh, kw]):")
    for name, shape, note in rows:
        print(f"  {name:<{width}}  {str(shape):<{shape_width}}  {note}")
    return 0


