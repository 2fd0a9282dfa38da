"""Stage 4's passes over the val images: the per-image numbers of every job, the top-image scan, the val ARVs.

One forward pass per batch gives the layer's input x and output a, the head-only backward gives the
gradient for the relative attribution, and the disentangled maps D1, ..., Dk, R are the checkpoint's
filters applied to x: the full original and disentangled networks never run. The gradient is that of each
image's own label logit, whatever the channel, so one pass serves any number of (channel, checkpoint) runs.
The numbers are ``utils.method.evaluation``'s; each pass is ``utils.data.scan``'s one scan.
"""
import numpy as np
import torch

from utils.concepts.by_classes import class_batches
from utils.data import scan
from utils.method import attribution
from utils.method.evaluation import channels_arvs, image_numbers
from utils.method.split import filter_maps, positive_mass
from utils.errors import UserError


def checkpoint_filters(state_dict):
    """(filters (k+1, C_in, kh, kw), bias (k+1,) or None) from a checkpoint [D1, ..., Dk, R]."""
    return state_dict["disentangled.weight"], state_dict.get("disentangled.bias")


def channel_numbers(x, a, pos, conv, channel, filters, bias):
    """``evaluation.image_numbers`` of ``channel`` and its checkpoint filters (k+1, C_in, kh, kw), bias (k+1,)
    or None, from the layer's input x (B, C_in, H, W), output a and pos (B, C_out) of one pass."""
    return image_numbers(a, pos, filter_maps(x, conv, filters, bias), channel)


def _on(device, channel, filters, bias):
    return channel, filters.to(device), None if bias is None else bias.to(device)


def evaluate_many(model, conv, runs, plan, indices, desc="stage 4"):
    """Stage-4 numbers of several checkpoints from one pass over the images ``indices`` of ``plan.dataset``.

    runs: list of (channel, filters (k+1, C_in, kh, kw), bias (k+1,) or None, classes); run r uses the images
    of its classes only. plan: the ``scan.ScanPlan`` of the three passes of this module (batch size, device,
    workers, ``unreadable`` 'error' or 'skip', and ``class_outputs``, whose logit the backward differentiates).
    Every batch holds one class (``class_batches``), so an image's numbers do not depend
    on the other runs: each run's arrays are bit-identical to those of a pass for it alone. One forward pass
    and head-only backward per batch serve every run.
    Returns one dict per run of numpy arrays (see ``evaluation.image_numbers``), plus ``index`` and ``label``
    of each image, and ``skipped``: the dataset indices of its images left out as unreadable.
    """
    ds, device = plan.dataset, plan.device
    model = model.to(device)
    prepared = [_on(device, c, f, b) for c, f, b, _ in runs]
    classes = [set(cl) for *_, cl in runs]
    union = set().union(*classes)
    batches = [b for b in class_batches(indices, [ds.targets[i] for i in indices], plan.batch_size)
               if ds.targets[b[0]] in union]
    parts = [[] for _ in runs]
    passes = scan.scan(model, conv, plan, batches, what=scan.GRADIENT, desc=desc)
    for b in passes:
        y = int(b.labels[0])  # the batch's one class
        pos = attribution.positive_attribution(b.a, b.g)
        for (c, f, bias), cl, part in zip(prepared, classes, parts):
            if y in cl:
                part.append(channel_numbers(b.x, b.a, pos, conv, c, f, bias))
    return [_run_arrays(ds, indices, cl, part, passes) for cl, part in zip(classes, parts)]


def _run_arrays(ds, indices, classes, part, passes):
    """One run's numbers of ``evaluate_many`` as numpy arrays, with the index and label of each image."""
    mine = [i for i in indices if ds.targets[i] in classes]
    if not part:
        raise UserError(f"none of the {len(mine)} images could be read")
    out = {k: torch.cat([p[k] for p in part]).cpu().numpy() for k in part[0]}
    kept = passes.kept(mine)
    out["index"] = np.asarray(kept)
    out["label"] = np.asarray([ds.targets[i] for i in kept])
    out["skipped"] = sorted(set(passes.skipped) & set(mine))
    return out


def scan_many(model, conv, runs, plan, indices):
    """Positive masses of several channels and their checkpoint maps from one forward pass up to the layer per
    batch (for the top-image contact sheets). runs: list of (channel, filters (k+1, C_in, kh, kw), bias);
    plan: a ``scan.ScanPlan``; indices: dataset indices of ``plan.dataset``.

    Returns the scanned indices (M,) (``indices`` less the unreadable ones when ``unreadable='skip'``) and one
    (orig_pos (M,), maps_pos (M, k+1)) pair of numpy arrays per run.
    """
    model = model.to(plan.device)
    banks = []
    for c, filters, bias in runs:
        w = torch.cat([conv.weight[c:c + 1].detach(), filters.to(conv.weight)])
        b = None if conv.bias is None else torch.cat([conv.bias[c:c + 1].detach(), bias.to(conv.bias)])
        banks.append((w, b))
    pos = [[] for _ in runs]
    passes = scan.scan(model, conv, plan, plan.batches(indices), what=scan.INPUT, desc="top images")
    for batch in passes:
        for (w, b), p in zip(banks, pos):
            p.append(positive_mass(filter_maps(batch.x, conv, w, b)))
    pos = [torch.cat(p).cpu().numpy() for p in pos]
    return passes.kept(indices), [(p[:, 0], p[:, 1:]) for p in pos]


ARV_BYTES = 2 ** 31  # the most that the val ARVs of one shared pass may hold (float64), about 2 GB


def scan_arvs(model, conv, channels, plan, indices):
    """``evaluation.channel_arvs`` of several channels on the images ``indices`` of ``plan.dataset`` (read as the
    ``scan.ScanPlan`` says), from one forward pass up to the layer only.

    Returns the scanned indices (M,) (less the unreadable ones when ``unreadable='skip'``) and {channel: (summed
    (M,), arvs (M, C_in))} float64 numpy arrays (to pick the val images of concepts given as clusters)."""
    model = model.to(plan.device)
    sums, arvs = {c: [] for c in channels}, {c: [] for c in channels}
    passes = scan.scan(model, conv, plan, plan.batches(indices), what=scan.INPUT_OUTPUT, desc="val ARVs")
    for batch in passes:
        for c, (s, r) in zip(channels, channels_arvs(batch.x, batch.a.float(), conv, channels)):
            sums[c].append(s.cpu())
            arvs[c].append(r.cpu())
    if not passes.kept(indices):
        raise UserError(f"none of the {len(indices)} val images could be read")
    return passes.kept(indices), {c: (torch.cat(sums[c]).numpy(), torch.cat(arvs[c]).numpy()) for c in channels}


def shared_arvs(scan_channels, channels, per_channel_bytes, limit=None):
    """The ``scan_arvs(channel, indices)`` that the jobs' ``val_images`` call, one after the other, for their
    ``channels`` (in job order): asked for a channel not at hand, it scans that channel and the next ones, as
    many as ``limit`` bytes hold, in one pass (``scan_channels(channels, indices)``: ``scan_arvs`` bound to
    the model and data); only that group is held. per_channel_bytes: the size of one channel's ARVs; limit:
    None for ``ARV_BYTES``."""
    order = list(dict.fromkeys(channels))
    group = max(1, (ARV_BYTES if limit is None else limit) // max(1, per_channel_bytes))
    held = {}

    def arvs(channel, indices):
        key = tuple(indices)
        if (channel, key) not in held:
            start = order.index(channel)
            kept, per = scan_channels(order[start:start + group], list(indices))
            held.clear()
            held.update({(c, key): (kept, *per[c]) for c in per})
        return held[(channel, key)]
    return arvs
