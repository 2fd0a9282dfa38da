"""Checks of a split's concepts against the layer and the data set, as one-line errors: a channel the layer has,
k >= 2 class lists of existing, disjoint classes."""
from utils.data import folders
from utils.errors import UserError


def check_channel(ctx, channel, flag):
    """Refuse a channel that layer ``ctx.layer_path`` (``ctx.conv``) does not have; ``flag`` names it."""
    if not 0 <= channel < ctx.conv.out_channels:
        raise UserError(f"{flag} {channel} is out of range: layer '{ctx.layer_path}' has "
                        f"{ctx.conv.out_channels} channels (0..{ctx.conv.out_channels - 1})")


def check_concepts_k(ds, concepts, names):
    """Refuse k >= 2 class lists where a class does not exist or is in two concepts; ``names`` name the concepts
    in errors."""
    if len(concepts) < 2:
        raise UserError(f"a split needs at least two concepts (got {len(concepts)})")
    for classes, name in zip(concepts, names):
        folders.check_classes(ds, classes, name)
    for i in range(len(concepts)):
        for j in range(i + 1, len(concepts)):
            both = sorted(set(concepts[i]) & set(concepts[j]))
            if both:
                raise UserError(f"class {both[0]} is in both concepts: {names[i]} and {names[j]} must be "
                                f"disjoint")
