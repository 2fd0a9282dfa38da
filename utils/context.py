"""What every stage script sets up from its flags: device, model, layer, dataset, store fingerprint."""
from dataclasses import dataclass

import torch.nn as nn

from . import cli, data, models, store


@dataclass
class Context:
    device: object
    model: nn.Module
    model_spec: str
    tag: str
    weights_id: str
    weights_sha256: str
    layer_path: str
    conv: nn.Conv2d
    dataset: object = None
    fingerprint: dict = None


def setup(args, split="train", need_data=True):
    """Parse the shared flags into a Context (the dataset of ``split`` when ``need_data``)."""
    device = cli.select_device(args.device, args.gpu)
    model, weights_id = models.load_model(args.model, args.weights)
    layer_path, conv = models.resolve_layer(model, args.layer_of_interest)
    models.check_nr_channels(conv, args.nr_channels_in_layer_of_interest, layer_path)
    if args.batch_size < 1:
        raise cli.UserError("--batch_size must be at least 1")
    ctx = Context(device=device, model=model, model_spec=args.model, tag=models.model_tag(args.model),
                  weights_id=weights_id, weights_sha256=models.weights_sha256(model),
                  layer_path=layer_path, conv=conv)
    if need_data:
        ctx.dataset = data.image_folder(args.data_dir, split)
        ctx.fingerprint = store.fingerprint(args.model, weights_id, ctx.weights_sha256, layer_path,
                                            models.layer_geometry(conv), data.dataset_summary(ctx.dataset),
                                            data.TRANSFORM_DESCRIPTION)
    return ctx


def check_channel(ctx, channel, flag):
    if not 0 <= channel < ctx.conv.out_channels:
        raise cli.UserError(f"{flag} {channel} is out of range: layer {ctx.layer_path} has "
                            f"{ctx.conv.out_channels} channels (0..{ctx.conv.out_channels - 1})")


def check_concepts(ds, classes1, classes2, names=("--classes_for_concept1", "--classes_for_concept2")):
    """Refuse classes that do not exist and a class in both concepts; ``names`` name the concepts in errors."""
    check_concepts_k(ds, [classes1, classes2], names)


def check_concepts_k(ds, concepts, names):
    """``check_concepts`` for k >= 2 class lists: every class exists, no class in two concepts."""
    if len(concepts) < 2:
        raise cli.UserError(f"a split needs at least two concepts (got {len(concepts)})")
    for classes, name in zip(concepts, names):
        data.check_classes(ds, classes, name)
    for i in range(len(concepts)):
        for j in range(i + 1, len(concepts)):
            both = sorted(set(concepts[i]) & set(concepts[j]))
            if both:
                raise cli.UserError(f"class {both[0]} is in both concepts: {names[i]} and {names[j]} must be "
                                    f"disjoint")
