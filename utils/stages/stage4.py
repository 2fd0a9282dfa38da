"""Stage 4: per-image numbers on the val images of both concepts, density curves, quantitative files.

One forward pass per batch gives the layer's input x and output a, the head-only backward gives the
gradient for the relative attribution, and the disentangled maps D1, D2, R are the three checkpoint
filters applied to x: the full original and disentangled networks never run. The gradient is that of each
image's own label logit, whatever the channel, so one pass serves any number of (channel, checkpoint) runs.
"""
import os

import numpy as np
import torch
from tqdm import tqdm
from utils.model import tap

from utils.method import attribution
from utils.data import folders
from utils.files import atomic
from utils.method import similarities
from utils.run.cli import UserError
from utils.method.split import filter_maps, positive_mass
from utils.concepts.by_classes import class_batches

MAP_NAMES = ("D1", "D2", "R")


def map_names(k):
    """Names of the maps of a k-way checkpoint: ('D1', ..., 'Dk', 'R')."""
    return tuple(f"D{j}" for j in range(1, k + 1)) + ("R",)


def checkpoint_filters(state_dict):
    """(filters (k+1, C_in, kh, kw), bias (k+1,) or None) from a checkpoint [D1, ..., Dk, R]."""
    return state_dict["disentangled.weight"], state_dict.get("disentangled.bias")


def forward_numbers(model, conv, images, labels):
    """One forward pass and the head-only backward of the labels' logits: what every channel's numbers need.

    images: (B, 3, H, W), labels: (B,). Returns the layer's input x (B, C_in, H_in, W_in) float32, its
    output a (B, C_out, H', W') and pos (B, C_out) = sum_{h,w} max(a * g, 0), g = d z_{y_n} / d a_n.
    """
    x, a, g, _ = tap.logits_and_layer_grad(model, conv, images, labels)
    return x.float(), a, attribution.positive_attribution(a, g)


def channel_numbers(x, a, pos, conv, channel, filters, bias):
    """Stage-4 numbers of one channel and its checkpoint filters from ``forward_numbers``' x, a, pos.

    Returns a dict of tensors on x's device: rel (B,) relative attribution of ``channel`` to the label;
    orig (B,) signed spatial sum of the channel's map; maps (B, k+1) signed sums of D1, ..., Dk, R;
    orig_pos (B,) and maps_pos (B, k+1) their positive masses pos(X) = sum max(X, 0).
    """
    d = filter_maps(x, conv, filters, bias)
    return {"rel": attribution.relative_of_positive(pos, channel),
            "orig": a[:, channel].sum(dim=(1, 2)),
            "maps": d.sum(dim=(2, 3)),
            "orig_pos": a[:, channel].clamp_min(0).sum(dim=(1, 2)),
            "maps_pos": positive_mass(d)}


def batch_numbers(model, conv, channel, filters, bias, images, labels):
    """``channel_numbers`` of one batch (images: (B, 3, H, W), labels: (B,)) as CPU tensors."""
    out = channel_numbers(*forward_numbers(model, conv, images, labels), conv, channel, filters, bias)
    return {k: v.cpu() for k, v in out.items()}


def _on(device, channel, filters, bias):
    return channel, filters.to(device), None if bias is None else bias.to(device)


def evaluate_many(model, conv, runs, ds, indices, batch_size, device, num_workers, desc="stage 4",
                  unreadable="error", hint="", class_outputs=None):
    """``evaluate`` of several checkpoints from one pass over the images ``indices`` of ``ds``.

    runs: list of (channel, filters (3, C_in, kh, kw), bias (3,) or None, classes); run r uses the images
    of its classes only. Every batch holds one class (``triples.class_batches``), so an image's numbers do
    not depend on the other runs: each run's arrays are bit-identical to ``evaluate`` of it alone.
    One forward pass and head-only backward per batch serve every run. Returns one dict per run (see
    ``evaluate``). ``class_outputs``: (K,) output index of each class folder (``utils/data/classmap.py``), whose logit
    the backward differentiates; None: folder y is output y.
    """
    outputs = None if class_outputs is None else torch.as_tensor(class_outputs, dtype=torch.int64)
    model = model.to(device)
    prepared = [_on(device, c, f, b) for c, f, b, _ in runs]
    classes = [torch.as_tensor(sorted(set(cl)), dtype=torch.int64) for *_, cl in runs]
    parts = [[] for _ in runs]
    batches = class_batches(indices, [ds.targets[i] for i in indices], batch_size)
    loader = folders.make_loader(ds, batches, num_workers, device, unreadable, hint)
    for images, labels in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        wanted = [torch.isin(labels, cl) for cl in classes]  # on the CPU
        if not any(bool(w.any()) for w in wanted):
            continue
        logit_of = labels if outputs is None else outputs[labels]  # the model's output of each image's class
        x, a, pos = forward_numbers(model, conv, images.to(device, non_blocking=True),
                                    logit_of.to(device, non_blocking=True))
        for (c, f, b), w, part in zip(prepared, wanted, parts):
            if bool(w.all()):
                part.append(channel_numbers(x, a, pos, conv, c, f, b))
            elif bool(w.any()):
                sel = w.to(device)
                part.append(channel_numbers(x[sel], a[sel], pos[sel], conv, c, f, b))
    skipped = set(loader.skipped)
    outs = []
    for (*_, cl), part in zip(runs, parts):
        mine = [i for i in indices if ds.targets[i] in set(cl)]
        if not part:
            raise UserError(f"none of the {len(mine)} images could be read")
        out = {k: torch.cat([p[k] for p in part]).cpu().numpy() for k in part[0]}
        kept = [i for i in mine if i not in skipped]
        out["index"] = np.asarray(kept)
        out["label"] = np.asarray([ds.targets[i] for i in kept])
        out["skipped"] = sorted(skipped & set(mine))
        outs.append(out)
    return outs


def evaluate(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers, desc="stage 4",
             unreadable="error", hint=""):
    """Stage-4 numbers (see ``channel_numbers``) over the images ``indices`` of ``ds`` as numpy arrays, plus
    index and label of each.

    ``unreadable``: 'error' or 'skip' (see folders.make_loader); skipped images are left out of every array
    and listed in ``out['skipped']`` (dataset indices).
    """
    classes = {ds.targets[i] for i in indices}
    return evaluate_many(model, conv, [(channel, filters, bias, classes)], ds, indices, batch_size, device,
                         num_workers, desc, unreadable, hint)[0]


def scan_many(model, conv, runs, ds, indices, batch_size, device, num_workers, unreadable="error", hint=""):
    """``scan_activations`` of several (channel, filters, bias) from one forward pass up to the layer per batch.

    Returns the scanned indices (M,) and one (orig_pos (M,), maps_pos (M, k+1)) pair of numpy arrays per run.
    """
    model = model.to(device)
    banks = []
    for c, filters, bias in runs:
        w = torch.cat([conv.weight[c:c + 1].detach(), filters.to(conv.weight)])
        b = None if conv.bias is None else torch.cat([conv.bias[c:c + 1].detach(), bias.to(conv.bias)])
        banks.append((w, b))
    pos = [[] for _ in runs]
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), num_workers, device, unreadable, hint)
    for images, _ in tqdm(loader, desc="top images", unit="batch", dynamic_ncols=True):
        x = tap.layer_input(model, conv, images.to(device, non_blocking=True)).float()
        for (w, b), p in zip(banks, pos):
            p.append(positive_mass(filter_maps(x, conv, w, b)))
    skipped = set(loader.skipped)
    pos = [torch.cat(p).cpu().numpy() for p in pos]
    return [i for i in indices if i not in skipped], [(p[:, 0], p[:, 1:]) for p in pos]


def scan_activations(model, conv, channel, filters, bias, ds, indices, batch_size, device, num_workers,
                     unreadable="error", hint=""):
    """Positive masses of the original channel and of D1, D2, R, from a forward pass up to the layer only.

    Returns the scanned indices (M,) (``indices`` less the unreadable ones when ``unreadable='skip'``),
    orig_pos (M,) and maps_pos (M, k+1) numpy arrays (for the top-image contact sheet).
    """
    scanned, ((orig_pos, maps_pos),) = scan_many(model, conv, [(channel, filters, bias)], ds, indices, batch_size,
                                                 device, num_workers, unreadable, hint)
    return scanned, orig_pos, maps_pos


def channel_arvs(x, a, conv, channel):
    """Summed activation s (B,) = sum_{h,w} a[:, channel] and per-image ARV r (B, C_in) of ``channel``, float64,
    from the layer's input x (B, C_in, H, W) and output a (B, C_out, H', W') of one forward pass:
    r[n, i] = sum_{kh,kw} W[c, i] P_n[i] with P_n the patch sums of x (``attribution.conv_patch_sums``)."""
    P = attribution.conv_patch_sums(x, conv)
    return a[:, channel].double().sum(dim=(1, 2)), similarities.arv(conv.weight[channel].detach(), P)


def scan_arvs(model, conv, channel, ds, indices, batch_size, device, num_workers, unreadable="error", hint=""):
    """``channel_arvs`` of the images ``indices`` of ``ds`` from a forward pass up to the layer only.

    Returns the scanned indices (M,) (less the unreadable ones when ``unreadable='skip'``), summed (M,) and
    arvs (M, C_in) float64 numpy arrays (to pick the val images of concepts given as clusters)."""
    model = model.to(device)
    sums, arvs = [], []
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), num_workers, device, unreadable, hint)
    for images, _ in tqdm(loader, desc="val ARVs", unit="batch", dynamic_ncols=True):
        x, a = tap.layer_input_output(model, conv, images.to(device, non_blocking=True))
        s, r = channel_arvs(x.float(), a.float(), conv, channel)
        sums.append(s.cpu())
        arvs.append(r.cpu())
    skipped = set(loader.skipped)
    if not sums:
        raise UserError(f"none of the {len(indices)} val images could be read")
    return ([i for i in indices if i not in skipped], torch.cat(sums).numpy(), torch.cat(arvs).numpy())


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
    """Rows D1/orig, ..., Dk/orig, R/orig for the images with rel >= tau.
    maps (N, k+1), orig (N,), rel (N,) -> (M, k+1) (k = 2: D1/orig, D2/orig, R/orig)."""
    keep = np.asarray(rel) >= tau
    return np.asarray(maps, dtype=np.float64)[keep] / np.asarray(orig, dtype=np.float64)[keep][:, None]


def format_rows(rows):
    return "".join(",".join(f"{v}" for v in row) + "\n" for row in rows)


def quantitative_prefix(k):
    """File-name infix of the quantitative files of k-way runs: '' for k = 2 (the published files), 'k3_', ..."""
    return "" if k == 2 else f"k{k}_"


def update_quantitative(folder, tau, run_key, rows_by_concept, meta, prefix=""):
    """Record this run's rows under ``run_key`` and rewrite the published files from all runs.

    ``folder/quantitative_concept{1,2}_required{tau}.txt`` hold every run's rows (a rerun replaces its
    own rows instead of appending duplicates); ``folder/runs_required{tau}.json`` is the record they are
    written from; ``folder/means_required{tau}.txt`` the column means per run and over all runs.
    Returns the overall means {concept: (k+1,) array or None} and row counts. Runs that finish at the same
    time take turns (a lock next to the record), so none of their rows is lost.
    rows_by_concept: {1: (M1, k+1), ..., k: (Mk, k+1)}. Runs of k > 2 concepts have k + 1 columns
    (D1/orig .. Dk/orig, R/orig) and their own files, named with ``quantitative_prefix(k)``
    (``quantitative_k3_concept3_required{tau}.txt``, ``runs_k3_...``, ``means_k3_...``). ``prefix`` goes before
    it: the runs of a layer other than the model's last conv have their own files (``means_resnet18_layer3.1.conv2_
    required0.03.txt``), so that the means of two layers never mix.
    """
    k = len(rows_by_concept)
    pre, width = prefix + quantitative_prefix(k), k + 1
    os.makedirs(folder, exist_ok=True)
    # several stage-4 processes may finish at once: the read-modify-write of the record is serialized
    with atomic.FileLock(os.path.join(folder, f".runs_{pre}required{tau}.lock"), wait=True):
        reg_path = os.path.join(folder, f"runs_{pre}required{tau}.json")
        runs = atomic.read_json(reg_path) if os.path.isfile(reg_path) else {}
        runs[run_key] = dict(meta, **{f"concept{j}": np.asarray(rows_by_concept[j]).tolist()
                                      for j in range(1, k + 1)})
        atomic.write_json(reg_path, runs, indent=None)
        lines = ["run,concept,images," + ",".join(f"mean_D{j}/orig" for j in range(1, k + 1)) + ",mean_R/orig"]
        overall = {}

        def fmt(m):
            return ",".join(f"{v:.6g}" for v in m)
        for concept in range(1, k + 1):
            allrows = [r for run in runs.values() for r in run[f"concept{concept}"]]
            atomic.write_text(os.path.join(folder, f"quantitative_{pre}concept{concept}_required{tau}.txt"),
                              format_rows(allrows))
            for key, run in runs.items():
                rows = np.asarray(run[f"concept{concept}"], dtype=np.float64).reshape(-1, width)
                m = rows.mean(axis=0) if len(rows) else [float("nan")] * width
                lines.append(f"{key},{concept},{len(rows)},{fmt(m)}")
            arr = np.asarray(allrows, dtype=np.float64).reshape(-1, width)
            overall[concept] = (arr.mean(axis=0) if len(arr) else None, len(arr))
        for concept in range(1, k + 1):
            m, n = overall[concept]
            m = m if m is not None else [float("nan")] * width
            lines.append(f"ALL,{concept},{n},{fmt(m)}")
        atomic.write_text(os.path.join(folder, f"means_{pre}required{tau}.txt"), "\n".join(lines) + "\n")
    return overall
