"""Stage 4's --get_feature_vis: the feature visualizations of a checkpoint, its targets' top val crops, the
figure and the record.

For the original channel and every disentangled map of the checkpoint (T = k + 1 targets: original, D1 .. Dk)
one MACO image (``utils.featurevis.render.visualize``, the spectrum of ``utils.featurevis.spectrum``); its
activation matrix A[v, t] (target t on visualization v through the evaluation transform); one scan of the
concepts' val images ranks them by each target, and each of a target's TOP_IMAGES best is shown as the box of
the layer's receptive field around its map's maximum, framed in its concept's colour. Writes
``names.feature_vis_files``: the figure (and a copy under the latest run's name), the raw images, the images and
transparency maps as arrays, and ``results_disentanglement/{run}_feature_vis.json``.
"""
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.data import folders, scan
from utils.featurevis import render
from utils.featurevis.objectives import target_filters, target_maps, values_and_peaks
from utils.featurevis.spectrum import load_or_make_spectrum
from utils.featurevis.transform import CROP_SCALE, NOISE
from utils.files import atomic, names
from utils.errors import UserError
from utils.data.folders import default_workers
from utils.method.evaluation import top_k

TOP_IMAGES = 12            # val crops around each visualization (the ring of a 4 x 4 grid)
CELL = 96                  # side of a val crop in the figure, pixels
CONCEPT_COLOURS = {1: (31, 119, 180), 2: (255, 127, 14), 3: (44, 160, 44), 4: (214, 39, 40), 5: (148, 103, 189),
                   6: (140, 86, 75)}   # frames of the val crops of concepts 1..6 (matplotlib's C0 .. C5)
TITLES = {"original": "Original"}


def title_of(name):
    """'original' -> 'Original', 'D2' -> 'Disentangled 2'."""
    return TITLES.get(name, f"Disentangled {name[1:]}")


def scan_val(model, conv, weights, bias, plan, indices):
    """Targets (weights (T, C_in, kh, kw), bias (T,) or None) on the val images ``indices`` of ``plan.dataset``
    (a ``scan.ScanPlan``) from a forward pass up to the layer: returns (kept indices (N,), values (N, T)
    = T_t per image, argmax positions (N, T, 2) of each target's map, map size (H', W'))."""
    w = weights.to(plan.device, torch.float32)
    b = None if bias is None else bias.to(plan.device, torch.float32)
    vals, poss, size = [], [], None
    sc = scan.scan(model, conv, plan, plan.batches(indices), desc="val images")
    with torch.no_grad():
        for batch in sc:
            maps = target_maps(batch.x, conv, w, b)
            size = tuple(maps.shape[-2:])
            v, p = values_and_peaks(maps)
            vals.append(v.cpu())
            poss.append(p.cpu())
    if not vals:
        raise UserError(f"none of the {len(indices)} val images could be read")
    return np.asarray(sc.kept(indices)), torch.cat(vals).numpy(), torch.cat(poss).numpy(), size


def _val_crop(path, box, cell, transform=folders.DEFAULT_TRANSFORM):
    """The ``box`` of a val image seen through the evaluation transform, resized to ``cell``: (cell, cell, 3)."""
    from PIL import Image
    from torchvision import transforms
    with Image.open(path) as im:
        im = transforms.CenterCrop(transform.crop)(transforms.Resize(transform.resize)(im.convert("RGB")))
        return np.asarray(im.crop(box).resize((cell, cell)), dtype=np.float64) / 255


def _wanted(ds, concepts, val_images):
    """The val images to rank and, per dataset index, its concept (1..k): from the concepts' classes, or given."""
    if val_images is None:
        return folders.indices_of_classes(ds, [y for c in concepts for y in c]), None
    of_index = {int(i): int(j) for i, j in zip(*val_images)}
    return sorted(of_index), of_index


def _concept_of(ds, kept, concepts, of_index):
    """Concept id 1..k of each kept val image (N,) int64: its class's concept, or the given one."""
    if of_index is not None:
        return np.asarray([of_index[int(i)] for i in kept], dtype=np.int64)
    labels = np.asarray([ds.targets[i] for i in kept])
    concept = np.zeros(len(kept), dtype=np.int64)
    for j in range(len(concepts), 0, -1):
        concept[np.isin(labels, concepts[j - 1])] = j
    return concept


def _panels(ctx, vis, targets, val, rf):
    """The figure's panels (title, faded image, framed val crops) and the record's top images of each target.
    val: (kept, values, positions, map size, concept ids)."""
    kept, vals, poss, map_size, concept = val
    ds, tf = ctx.dataset, ctx.transform
    panels, top = [], {}
    images, transp = vis["images"].numpy(), vis["transparency"].numpy()
    for t, name in enumerate(targets):
        crops, top[name] = [], []
        for i in top_k(vals[:, t], TOP_IMAGES):
            box = render.rf_box(tuple(poss[i, t]), map_size, rf, tf.crop)
            crops.append((_val_crop(ds.samples[kept[i]][0], box, CELL, tf), CONCEPT_COLOURS[int(concept[i])]))
            top[name].append({"image": folders.relative_name(ds, int(kept[i])), "concept": int(concept[i]),
                              "value": float(vals[i, t]), "box": list(box)})
        panels.append((title_of(name), render.faded(images[t], transp[t]), crops))
    return panels, top


def _write_pictures(ctx, files, channel, panels, vis, targets, latest=True):
    """The figure, its copy under the latest run's name (with ``latest``), the raw images and the two arrays."""
    from utils.report import plots
    title = f"{ctx.tag} {ctx.layer_path} channel {channel}"
    images = vis["images"].numpy()
    plots.feature_vis_figure(files["figure"], panels, title, cell=CELL)
    plots.image_row(files["raw"], [im.transpose(1, 2, 0) for im in images], [title_of(n) for n in targets], title)
    atomic.save_npy(files["images"], images.astype(np.float32))
    atomic.save_npy(files["transparency"], vis["transparency"].numpy().astype(np.float32))
    if latest:
        copy_as_latest(files)


def copy_as_latest(files):
    """Copy a run's figure (``names.feature_vis_files``) to the name of the latest run's figure."""
    with atomic.atomic_path(files["latest"]) as tmp:
        shutil.copyfile(files["figure"], tmp)


def files_of(ctx, out_dir, run_name):
    """``names.feature_vis_files`` of one run of ``ctx``'s model and layer."""
    return names.feature_vis_files(out_dir, run_name, names.latest_suffix(ctx.name or ctx.tag, ctx.tag))


def _print_table(targets, act, record, settings, opt_seconds, files):
    print("visualization \\ target " + " ".join(f"{n:>10}" for n in targets))
    for t, n in enumerate(targets):
        print(f"{title_of(n):>22} " + " ".join(f"{v:10.4g}" for v in act[t].tolist()))
    print(f"{'val max':>22} " + " ".join(f"{v:10.4g}" for v in record["val_max"]))
    print(f"{settings.steps} steps of {len(targets)} x {settings.crops} crops at S={settings.size}: "
          f"{opt_seconds:.1f} s; wrote {files['figure']} and {files['record']}")


def _filters(conv, channel, state_dict):
    """``target_filters`` of a checkpoint, refused (UserError, one line) where it does not fit the layer."""
    try:
        return target_filters(conv, channel, state_dict)
    except ValueError as e:
        raise UserError(str(e)) from None


def checked_filters(conv, channel, state_dict):
    """(weights (T, C_in, kh, kw), bias or None) of a checkpoint's targets, refused (one line) where it does not
    fit the layer."""
    return _filters(conv, channel, state_dict)[:2]


def spectrum_of(settings):
    """(spectrum, its path, whether it was reused) of the run's size and training images."""
    return load_or_make_spectrum(settings.store_dir, settings.data_dir, settings.size, settings.spectrum_images,
                                 settings.batch_size, default_workers(settings.num_workers))


def model_input(ctx):
    """The ``render.ModelInput`` of ``ctx``: its model (moved to its device), layer and transform."""
    tf = ctx.transform
    return render.ModelInput(ctx.model.to(ctx.device), ctx.conv, tf.crop, tf.resize, tf.mean, tf.std, ctx.device)


def maco_of(settings, spec):
    """The ``render.Maco`` of a run's settings and spectrum (``spectrum_of``)."""
    return render.Maco(spec["magnitude"], spec["q"], settings.size, settings.steps, settings.crops, settings.lr,
                       settings.batch_size)


def optimize(ctx, settings, spec, filters):
    """The visualizations of jobs: filters = [(weights (T_i, C_in, kh, kw), bias or None)] -> [(vis, seconds)],
    one per job. Consecutive jobs share one ``render.visualize_many`` up to ``settings.batch_targets`` targets
    (0: each job alone, ``render.visualize``'s numbers); a job's seconds are its share (by targets) of its
    optimization's time."""
    out, maco = [], maco_of(settings, spec)
    runs = render.runs_of_targets([w.shape[0] for w, _ in filters], settings.batch_targets)
    for run in runs:
        t0 = time.time()
        vis = render.visualize_many(model_input(ctx), [filters[i] + (settings.seed,) for i in run], maco)
        seconds, targets = time.time() - t0, sum(filters[i][0].shape[0] for i in run)
        out += [(v, seconds * filters[i][0].shape[0] / targets) for i, v in zip(run, vis)]
    return out


class BatchedJobs:
    """The visualizations of several jobs, one ``optimize`` per run of consecutive jobs of up to
    ``settings.batch_targets`` targets (0: each job alone, as ``run_for_checkpoint`` would), made when the first
    job of a run asks for its own (so at most one run's images are held), with one read of the spectrum.
    runs: [(run name, channel, state_dict)] in the order the jobs write; every checkpoint is checked here,
    before any job writes."""

    def __init__(self, ctx, settings, runs):
        self.ctx, self.settings = ctx, settings
        self.filters = {name: _filters(ctx.conv, channel, sd)[:2] for name, channel, sd in runs}
        order = [name for name, _, _ in runs]
        self.plan = [[order[i] for i in run] for run in render.runs_of_targets(
            [self.filters[n][0].shape[0] for n in order], settings.batch_targets)]
        self.ready, self.spectrum = {}, None

    def describe(self):
        """One line: how many optimizations make the planned visualizations."""
        n, jobs = len(self.plan), sum(map(len, self.plan))
        how = (f"in runs of up to {self.settings.batch_targets} targets" if self.settings.batch_targets else
               "each alone")
        return f"feature visualization of {jobs} checkpoints {how}: {n} optimization{'s' if n != 1 else ''}"

    def take(self, name):
        """The entry of run ``name`` for ``run_for_checkpoint(prepared=...)``, or None for a run not planned."""
        if name not in self.filters:
            return None
        if name not in self.ready:
            run = next(r for r in self.plan if name in r)
            spectrum = self.spectrum or spectrum_of(self.settings)
            done = optimize(self.ctx, self.settings, spectrum[0], [self.filters[n] for n in run])
            self.ready = {n: {"vis": vis, "seconds": sec, "spectrum": spectrum} for n, (vis, sec) in zip(run, done)}
            self.spectrum = spectrum[:2] + (True,)  # the later runs reuse it, as each job's own read would say
        return self.ready[name]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One checkpoint to visualize: ``run_name`` (its files' names), the ``channel`` it splits, its
    ``state_dict`` ([D1, ..., Dk, R] as ``disentangled.weight``), ``concepts``: the k class lists of the concepts
    (val images of concept j: those of its classes), ``val_images``: instead, (dataset indices, concept ids
    1..k) of the val images to rank (concepts given as clusters), or None."""
    run_name: str
    channel: int
    state_dict: dict
    concepts: list
    val_images: tuple = None


def run_for_checkpoint(ctx, settings, checkpoint, out_dir, prepared=None, latest=True):
    """Stage 4's --get_feature_vis for one ``Checkpoint`` (``settings``: ``utils.featurevis.settings.Settings``).

    prepared: its entry of ``BatchedJobs.take`` (the images already optimized), None to optimize them here;
    latest: also copy the figure to the latest run's name (``copy_as_latest``). Returns the record."""
    channel, concepts, val_images = checkpoint.channel, checkpoint.concepts, checkpoint.val_images
    state_dict, run_name = checkpoint.state_dict, checkpoint.run_name
    start = time.time()
    device, model, conv, tf = ctx.device, ctx.model.to(ctx.device), ctx.conv, ctx.transform
    weights, bias, targets = _filters(conv, channel, state_dict)
    workers = default_workers(settings.num_workers)
    spec, spec_path, reused = spectrum_of(settings) if prepared is None else prepared["spectrum"]
    print(f"feature visualization: {'reusing' if reused else 'computed'} the spectrum {spec_path}")
    vis, opt_seconds = (optimize(ctx, settings, spec, [(weights, bias)])[0] if prepared is None else
                        (prepared["vis"], prepared["seconds"]))
    start -= 0 if prepared is None else opt_seconds
    act = render.activation_matrix(model_input(ctx), weights, bias, vis["images"].to(device)).cpu()
    wanted, of_index = _wanted(ctx.dataset, concepts, val_images)
    plan = scan.ScanPlan(ctx.dataset, settings.batch_size, device, workers, settings.unreadable)
    kept, vals, poss, map_size = scan_val(model, conv, weights, bias, plan, wanted)
    rf, _ = render.receptive_field(model, conv, tf.crop, device)
    concept = _concept_of(ctx.dataset, kept, concepts, of_index)
    panels, top = _panels(ctx, vis, targets, (kept, vals, poss, map_size, concept), rf)
    files = files_of(ctx, out_dir, run_name)
    _write_pictures(ctx, files, channel, panels, vis, targets, latest)
    record = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": channel,
              **({f"classes{j}": c for j, c in enumerate(concepts, start=1)} if val_images is None else
                 {f"val_images_concept{j}": int((concept == j).sum()) for j in range(1, len(targets))}),
              "targets": targets, "titles": [title_of(n) for n in targets],
              "activation": act.tolist(), "val_max": [float(v) for v in vals.max(axis=0)],
              "val_images": int(len(kept)), "size": settings.size, "steps": settings.steps, "crops": settings.crops,
              **({"preset": settings.preset} if settings.preset else {}),  # --fv_preset given (else as before)
              "seed": settings.seed, "lr": settings.lr, "batch_size": settings.batch_size, "device": str(device),
              "crop_scale": list(CROP_SCALE), "noise": NOISE, "spectrum": spec_path, "spectrum_reused": reused,
              "receptive_field": list(rf), "seconds": round(time.time() - start, 2),
              "seconds_optimization": round(opt_seconds, 2),
              "seconds_per_step": round(opt_seconds / settings.steps, 4),
              "final_crop_mean": vis["history"][-1], "top_images": top,
              "images": os.path.basename(files["images"]),
              "transparency": os.path.basename(files["transparency"]), "figure": files["figure"]}
    atomic.write_json(files["record"], record)
    _print_table(targets, act, record, settings, opt_seconds, files)
    return record
