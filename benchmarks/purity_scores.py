r"""How pure a unit is on images whose true concepts are known (the demo: every class is colour x texture).

A unit is anything with a map per image (a channel, a disentangled map D_j, an SAE feature's contribution
to a channel, a virtual neuron); all it needs here is its positive mass per val image, pos(X) = sum_{h,w}
max(X[h, w], 0). For a grouping g of the images (class, colour or texture):
    activation-weighted purity = max_y sum_{n: g_n = y} pos_n / sum_n pos_n
(the share of the unit's positive mass summed over all images that falls on its heaviest group),
    top-N purity = share of the unit's N most activating images that belong to their most common group,
    share of the channel = sum_n pos_n(unit) / sum_n pos_n(channel).
Top-N purity alone misleads: a polysemantic channel's top images can all come from its stronger concept.
"""
import numpy as np

from utils.method.evaluation import top_k


def activation_purity(pos, groups):
    """(purity, heaviest group) of masses pos (N,) >= 0 over groups (N,) ints; (nan, -1) if all pos are 0."""
    pos, groups = np.asarray(pos, dtype=np.float64), np.asarray(groups)
    total = pos.sum()
    if not total > 0:
        return float("nan"), -1
    labels, inv = np.unique(groups, return_inverse=True)
    mass = np.bincount(inv, weights=pos, minlength=len(labels))
    j = int(np.argmax(mass))
    return float(mass[j] / total), int(labels[j])


def top_n_purity(pos, groups, n):
    """Share of the n images with the largest pos (ties: lower position first) in their most common group."""
    pos, groups = np.asarray(pos, dtype=np.float64), np.asarray(groups)
    order = top_k(pos, n)
    if len(order) == 0:
        return float("nan")
    return float(np.bincount(np.unique(groups[order], return_inverse=True)[1]).max() / len(order))


def share_of_channel(pos_unit, pos_channel):
    """sum pos(unit) / sum pos(channel) over the same images."""
    total = float(np.sum(np.asarray(pos_channel, dtype=np.float64)))
    return float(np.sum(np.asarray(pos_unit, dtype=np.float64)) / total) if total > 0 else float("nan")


def virtual_neurons(pos_channel, member, k):
    """PURE-style virtual neurons of a channel: neuron j keeps the channel's mass on the images whose
    L1-normalised ARV is nearest to centroid j, 0 on the others. pos_channel (N,); member (N,) ints: each image's
    nearest centroid (``utils.method.clustering.nearest_centroid``); k centroids -> (k, N) float64."""
    member = np.asarray(member)
    pos = np.asarray(pos_channel, dtype=np.float64)
    return np.stack([np.where(member == j, pos, 0.0) for j in range(k)])


def colour_texture(class_names):
    """Group ids of colour and texture per class from names '<colour>_<texture>': two (K,) int arrays."""
    parts = [name.split("_", 1) for name in class_names]
    colours = sorted({p[0] for p in parts})
    textures = sorted({p[1] if len(p) > 1 else "" for p in parts})
    return (np.asarray([colours.index(p[0]) for p in parts]),
            np.asarray([textures.index(p[1] if len(p) > 1 else "") for p in parts]))


def score_unit(pos, labels, class_names, n, pos_channel):
    """Every number of one unit. pos (N,) its positive mass per val image; labels (N,) class indices;
    n: N of the top-N purity (the val images per class); pos_channel (N,): its channel's positive mass."""
    labels = np.asarray(labels)
    colour, texture = colour_texture(class_names)
    purity, heaviest = activation_purity(pos, labels)
    return {"purity": purity, "class": class_names[heaviest] if heaviest >= 0 else None,
            "purity_colour": activation_purity(pos, colour[labels])[0],
            "purity_texture": activation_purity(pos, texture[labels])[0],
            "top_n_purity": top_n_purity(pos, labels, n), "share": share_of_channel(pos, pos_channel)}
