"""Stage 4: per-image numbers on the val images of both concepts, density curves, quantitative files.

One forward pass per batch gives the layer's input x and output a, the head-only backward gives the
gradient for the relative attribution, and the disentangled maps D1, D2, R are the three checkpoint
filters applied to x: the full original and disentangled networks never run.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from . import attribution, data, fileio
from .disentangle import filter_maps, positive_mass

MAP_NAMES = ("D1", "D2", "R")


def checkpoint_filters(state_dict):
    """(filters (3, C_in, kh, kw), bias (3,) or None) from a published checkpoint."""
    return state_dict["disentangled.weight"], state_dict.get("disentangled.bias")


def batch_numbers(model, conv, channel, filters, bias, images, labels):
    """Stage-4 numbers for one batch. images: (B, 3, H, W), labels: (B,).

    Returns a dict of CPU tensors: rel (B,) relative attribution of ``channel`` to the label;
    orig (B,) signed spatial sum of the channel's map; maps (B, 3) signed sums of D1, D2, R;
    orig_pos (B,) and maps_pos (B, 3) their positive masses pos(X) = sum max(X, 0).
    """
    x, a, g, _ = attribution.logits_and_layer_grad(model, conv, images, labels)
    d = filter_maps(x.float(), conv, filters, bias)
    return {"rel": attribution.relative_attribution(a, g, channel).cpu(),
            "orig": a[:, channel].sum(dim=(1, 2)).cpu(),
            "maps": d.sum(dim=(2, 3)).cpu(),
            "orig_pos": a[:, channel].clamp_min(0).sum(dim=(1, 2)).cpu(),
            "maps_pos": positive_mass(d).cpu()}


def evaluate(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers, desc="stage 4"):
    """``batch_numbers`` over the images ``indices`` of ``ds``; returns numpy arrays plus index, label."""
    model = model.to(device)
    filters = filters.to(device)
    bias = None if bias is None else bias.to(device)
    parts = []
    loader = data.make_loader(ds, data.batches_of(indices, batch_size), num_workers, device)
    for images, labels in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        parts.append(batch_numbers(model, conv, channel, filters, bias,
                                   images.to(device, non_blocking=True), labels.to(device, non_blocking=True)))
    out = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    out["index"] = np.asarray(indices)
    out["label"] = np.asarray([ds.targets[i] for i in indices])
    return out


def scan_activations(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers):
    """Positive masses of the original channel and of D1, D2, R, from a forward pass up to the layer only.

    Returns orig_pos (N,) and maps_pos (N, 3) numpy arrays (for the top-image contact sheet).
    """
    model = model.to(device)
    w = torch.cat([conv.weight[channel:channel + 1].detach(), filters.to(conv.weight)])
    b = None
    if conv.bias is not None:
        b = torch.cat([conv.bias[channel:channel + 1].detach(), bias.to(conv.bias)])
    pos = []
    loader = data.make_loader(ds, data.batches_of(indices, batch_size), num_workers, device)
    for images, _ in tqdm(loader, desc="top images", unit="batch", dynamic_ncols=True):
        x = attribution.layer_input(model, conv, images.to(device, non_blocking=True))
        pos.append(positive_mass(filter_maps(x.float(), conv, w, b)).cpu())
    pos = torch.cat(pos).numpy()
    return pos[:, 0], pos[:, 1:]


def top_k(scores, k):
    """Positions of the k largest scores, largest first (ties: lower position first). (N,) -> (min(k,N),)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def kde_curve(values, gridsize=200, cut=3.0):
    """Gaussian KDE as seaborn's kdeplot: Scott's rule, ``gridsize`` points from min - cut*bw to max + cut*bw.

    values: (N,) -> (xs, ys), or None when the density is undefined (fewer than 2 distinct values).
    """
    from scipy.stats import gaussian_kde  # here: only the density curves need scipy
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or np.ptp(v) == 0:
        return None
    kde = gaussian_kde(v, bw_method="scott")
    bw = float(np.sqrt(kde.covariance[0, 0]))
    xs = np.linspace(v.min() - cut * bw, v.max() + cut * bw, gridsize)
    return xs, kde(xs)


def filecontents_block(name, xs, ys):
    """LaTeX ``filecontents*`` block with one ``x y`` line per point."""
    lines = [f"\\begin{{filecontents*}}{{{name}.dat}}"]
    lines += [f"{x} {y}" for x, y in zip(xs, ys)]
    lines.append("\\end{filecontents*}")
    return "\n".join(lines) + "\n"


def quantitative_rows(maps, orig, rel, tau):
    """Rows D1/orig, D2/orig, R/orig for the images with rel >= tau. maps (N, 3), orig (N,), rel (N,) -> (M, 3)."""
    keep = np.asarray(rel) >= tau
    return np.asarray(maps, dtype=np.float64)[keep] / np.asarray(orig, dtype=np.float64)[keep][:, None]


def format_rows(rows):
    return "".join(f"{a},{b},{c}\n" for a, b, c in rows)


def update_quantitative(folder, tau, run_key, rows_by_concept, meta):
    """Record this run's rows under ``run_key`` and rewrite the published files from all runs.

    ``folder/quantitative_concept{1,2}_required{tau}.txt`` hold every run's rows (a rerun replaces its
    own rows instead of appending duplicates); ``folder/runs_required{tau}.json`` is the record they are
    written from; ``folder/means_required{tau}.txt`` the column means per run and over all runs.
    Returns the overall means {concept: (3,) array or None} and row counts.
    """
    reg_path = os.path.join(folder, f"runs_required{tau}.json")
    runs = fileio.read_json(reg_path) if os.path.isfile(reg_path) else {}
    runs[run_key] = dict(meta, concept1=np.asarray(rows_by_concept[1]).tolist(),
                         concept2=np.asarray(rows_by_concept[2]).tolist())
    fileio.write_json(reg_path, runs, indent=None)
    lines = ["run,concept,images,mean_D1/orig,mean_D2/orig,mean_R/orig"]
    overall = {}
    for concept in (1, 2):
        allrows = [r for run in runs.values() for r in run[f"concept{concept}"]]
        fileio.write_text(os.path.join(folder, f"quantitative_concept{concept}_required{tau}.txt"),
                          format_rows(allrows))
        for key, run in runs.items():
            rows = np.asarray(run[f"concept{concept}"], dtype=np.float64).reshape(-1, 3)
            m = rows.mean(axis=0) if len(rows) else [float("nan")] * 3
            lines.append(f"{key},{concept},{len(rows)},{m[0]:.6g},{m[1]:.6g},{m[2]:.6g}")
        arr = np.asarray(allrows, dtype=np.float64).reshape(-1, 3)
        overall[concept] = (arr.mean(axis=0) if len(arr) else None, len(arr))
    for concept in (1, 2):
        m, n = overall[concept]
        m = m if m is not None else [float("nan")] * 3
        lines.append(f"ALL,{concept},{n},{m[0]:.6g},{m[1]:.6g},{m[2]:.6g}")
    fileio.write_text(os.path.join(folder, f"means_required{tau}.txt"), "\n".join(lines) + "\n")
    return overall
