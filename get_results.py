r"""Stage 4: how well a disentangled channel separates its two concepts, on the val images.

Example (the paper's quantitative table uses tau = 0.03):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --channel_of_interest 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938 --get_qualitative --get_quantitative

All the paper's triples in one process (one model load, one pass over the union of their val images;
the files are those of one run per triple in file order, byte for byte):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --triples paper_triples.txt \
      --get_quantitative --proportion_attribution_required 0.03
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, context, data, evaluation, featurevis, fileio, sae_view, store
from utils.disentangle import checkpoint_name
from utils.triples import check_triples, triples_from_args, union_classes


def find_checkpoint(model_dir, name):
    for folder in (os.path.join(model_dir, "models_disentangled"), model_dir):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise cli.UserError(f"checkpoint {name} not found in {model_dir}/models_disentangled: run "
                        f"disentangle_channel.py with the same channel, classes and --store_dir first "
                        f"(--model_dir is that --store_dir)")


def check_checkpoint(ctx, sd, channel, path, val_summary):
    """Refuse a checkpoint that does not belong to this model, layer and channel."""
    w = ctx.conv.weight[channel].detach()
    D = sd.get("disentangled.weight")
    if D is None or tuple(D.shape) != (3,) + tuple(w.shape):
        raise cli.UserError(f"{path}: disentangled.weight has shape {None if D is None else tuple(D.shape)}, "
                            f"expected {(3,) + tuple(w.shape)} for layer {ctx.layer_path}")
    if not torch.allclose(D[0] + D[1] - D[2], w.cpu(), atol=1e-6, rtol=1e-5):
        raise cli.UserError(f"{path}: D1 + D2 - R differs from channel {channel}'s filter of {ctx.layer_path}: "
                            f"the checkpoint was made for another model, weights, layer or channel")
    info_path = path[:path.rfind("_f")] + "_info.json"
    if os.path.isfile(info_path):
        info = fileio.read_json(info_path)
        expected = dict(ctx.fingerprint, classes=val_summary["classes"])
        diff = store.describe_mismatch(info, expected, ("model", "weights_sha256", "layer", "layer_geometry",
                                                        "classes"))
        if diff:
            raise cli.UserError(f"{path} was made with other settings: {diff}")
        return info
    return None


def load_checkpoint(ctx, args, t, rho, val_summary):
    """Find, read and check triple ``t``'s checkpoint. Returns (path, name, state dict, info or None)."""
    name = checkpoint_name(ctx.tag, t.channel, t.classes1, t.classes2, rho)
    path = find_checkpoint(args.model_dir, name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise cli.UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})")
    return path, name, sd, check_checkpoint(ctx, sd, t.channel, path, val_summary)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p, store=False)
    p.add_argument("--model_dir", required=True,
                   help="the --store_dir of stage 3 (holding models_disentangled/)")
    p.add_argument("--channel_of_interest", type=int, default=None,
                   help="the disentangled channel (required unless --triples)")
    p.add_argument("--classes_for_concept1", nargs="+", default=None,
                   help="class indices of concept 1 (required unless --triples)")
    p.add_argument("--classes_for_concept2", nargs="+", default=None,
                   help="class indices of concept 2 (required unless --triples)")
    p.add_argument("--triples", default=None,
                   help="file of 'channel classes1 classes2' lines (as paper_triples.txt; several classes as "
                        "1,2): evaluate every triple in one process, writing what one run per triple in file "
                        "order writes, instead of the three flags above")
    p.add_argument("--f", type=float, default=None, help="rho of the checkpoint to evaluate (default: best)")
    p.add_argument("--get_qualitative", action="store_true", help="density plots and their data files")
    p.add_argument("--get_quantitative", action="store_true", help="D1/orig, D2/orig, R/orig per image")
    p.add_argument("--proportion_attribution_required", type=float, default=0.03,
                   help="tau: images whose relative attribution to the channel is >= tau count (default 0.03)")
    p.add_argument("--get_top_images", action="store_true",
                   help="contact sheet of the val images activating original, D1 and D2 the most")
    p.add_argument("--top_k", type=int, default=8, help="images per row of the contact sheet (default 8)")
    p.add_argument("--top_images_all_val", action="store_true",
                   help="scan the whole val split for the top images (default: the two concepts' classes)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave val images whose files cannot be decoded out of every number (default: stop "
                        "with a message naming the file)")
    p.add_argument("--out_dir", default=".",
                   help="folder for plots/, results_disentanglement/, results_quantitative/ (default: working directory)")
    featurevis.add_args(p)  # --get_feature_vis and its --fv_* flags
    sae_view.add_args(p)  # --get_sae_view and its --sae_* flags
    args = p.parse_args()
    triples = triples_from_args(args.triples, args.channel_of_interest, args.classes_for_concept1,
                                args.classes_for_concept2, "--channel_of_interest", cli.parse_classes)
    if args.top_k < 1:
        raise cli.UserError("--top_k must be at least 1")

    ctx = context.setup(args, split="val")
    check_triples(ctx, triples, "--channel_of_interest")
    sae_view.check_args(args, ctx.conv)
    ds = ctx.dataset
    rho = "best" if args.f is None else args.f
    summary_of_val = data.dataset_summary(ds)
    checkpoints = [load_checkpoint(ctx, args, t, rho, summary_of_val) for t in triples]
    for t in triples:
        for k, classes in ((1, t.classes1), (2, t.classes2)):
            if not data.indices_of_classes(ds, classes):
                where = f"{t.where}: concept {k}" if t.where else f"--classes_for_concept{k}"
                raise cli.UserError(f"{where}: no val images of classes {classes} under {args.data_dir}/val")

    # one forward and head-only backward over the val images of every triple's classes, each image once
    indices = data.indices_of_classes(ds, union_classes(triples))
    workers = cli.default_workers(args.num_workers)
    unreadable = "skip" if args.skip_unreadable else "error"
    hint = ": replace or remove the file, or pass --skip_unreadable to leave it out"
    filters = [evaluation.checkpoint_filters(sd) for _, _, sd, _ in checkpoints]
    results = evaluation.evaluate_many(ctx.model, ctx.conv, [(t.channel, f, b, t.classes) for t, (f, b) in
                                                             zip(triples, filters)],
                                       ds, indices, args.batch_size, ctx.device, workers,
                                       unreadable=unreadable, hint=hint)
    scans = [None] * len(triples)
    if args.get_top_images and args.top_images_all_val:
        scanned, pos = evaluation.scan_many(ctx.model, ctx.conv, [(t.channel, f, b) for t, (f, b) in
                                                                  zip(triples, filters)],
                                            ds, list(range(len(ds))), args.batch_size, ctx.device, workers,
                                            unreadable=unreadable, hint=hint)
        scans = [(scanned, o, m) for o, m in pos]
    for t, r in zip(triples, results):  # every triple checked before anything is written
        concept = np.where(np.isin(r["label"], t.classes1), 1, 2)
        for k in (1, 2):
            if not (concept == k).any():
                raise cli.UserError(f"{t.where + ': ' if t.where else ''}concept {k}: none of its val images "
                                    f"could be read")
    for t, (path, name, sd, info), r, scan in zip(triples, checkpoints, results, scans):
        if args.triples is not None:
            print(f"=== {t.where}: channel {t.channel}, classes {t.classes1} vs {t.classes2}")
        write_results(args, ctx, t, rho, path, name, sd, info, r, scan)


def write_results(args, ctx, t, rho, path, name, sd, info, r, whole_val):
    """Print and write one triple's results: what one run of this script for ``t`` alone writes.

    r: its numbers from ``evaluation.evaluate_many``; whole_val: its (indices, orig_pos, maps_pos) from the
    whole-val scan for the top images, or None.
    """
    ds, c, s1, s2, tau = ctx.dataset, t.channel, t.classes1, t.classes2, args.proportion_attribution_required
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable val images: "
              + ", ".join(data.relative_name(ds, i) for i in r["skipped"][:5])
              + (", ..." if len(r["skipped"]) > 5 else ""))
    concept = np.where(np.isin(r["label"], s1), 1, 2)
    names = ds.classes
    label_of = {1: ", ".join(names[y] for y in s1), 2: ", ".join(names[y] for y in s2)}
    run_name = name[:-len(".pth")]
    out = args.out_dir
    summary = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": c, "classes1": s1, "classes2": s2,
               "class_names1": [names[y] for y in s1], "class_names2": [names[y] for y in s2],
               "checkpoint": path, "rho": info["best_rho"] if (info and rho == "best") else rho,
               "max_logit_diff": info.get("max_logit_diff") if info else None,
               "unreadable_val_images": [data.relative_name(ds, i) for i in r["skipped"]]}
    for k in (1, 2):
        sel = concept == k
        mp = r["maps_pos"][sel]
        a, b = (0, 1) if k == 1 else (1, 0)
        summary[f"val_images_concept{k}"] = int(sel.sum())
        summary[f"sep_concept{k}"] = float(mp[:, a].mean() / max(mp[:, b].mean(), 1e-12)) if sel.any() else None
        summary[f"mean_pos_concept{k}"] = {"original": float(r["orig_pos"][sel].mean()) if sel.any() else None,
                                           **{n: float(mp[:, i].mean()) if sel.any() else None
                                              for i, n in enumerate(evaluation.MAP_NAMES)}}
    print(f"channel {c} of {ctx.layer_path}, checkpoint {os.path.basename(path)}")
    for k in (1, 2):
        print(f"concept {k} ({label_of[k]}): {summary[f'val_images_concept{k}']} val images, "
              f"mean pos(D{k}) / mean pos(D{3 - k}) = {summary[f'sep_concept{k}']:.3g}")

    if args.get_qualitative:
        from utils import plots  # matplotlib: only for a run that draws
        for k in (1, 2):
            sel = concept == k
            curves = [(label, evaluation.kde_curve(vals)) for label, vals in
                      zip(plots.CURVE_LABELS, (r["orig"][sel], r["maps"][sel, 0], r["maps"][sel, 1]))]
            title = f"{ctx.tag} {ctx.layer_path} channel {c}, concept {k}: {label_of[k]}"
            for fname in (f"density_concept{k}.png", f"{run_name}_density_concept{k}.png"):
                plots.density_plot(os.path.join(out, "plots", fname), curves, title)
            blocks = [evaluation.filecontents_block(f"{n}_c{k}", *cv) for n, (_, cv) in
                      zip(("original", "disentangled1", "disentangled2"), curves) if cv is not None]
            fileio.write_text(os.path.join(out, "results_disentanglement", f"density_concept{k}.txt"), "".join(blocks))
        print(f"wrote {out}/plots/density_concept{{1,2}}.png and {out}/results_disentanglement/density_concept{{1,2}}.txt")

    if args.get_quantitative:
        rows = {k: evaluation.quantitative_rows(r["maps"][concept == k], r["orig"][concept == k],
                                                r["rel"][concept == k], tau) for k in (1, 2)}
        folder = os.path.join(out, "results_quantitative")
        overall = evaluation.update_quantitative(folder, tau, run_name, rows,
                                                 {"model": ctx.model_spec, "layer": ctx.layer_path})
        for k in (1, 2):
            m = rows[k].mean(axis=0) if len(rows[k]) else [float("nan")] * 3
            summary[f"quantitative_concept{k}"] = {"images": len(rows[k]), "D1/orig": float(m[0]),
                                                   "D2/orig": float(m[1]), "R/orig": float(m[2])}
            om, on = overall[k]
            print(f"concept {k}: {len(rows[k])} of {summary[f'val_images_concept{k}']} val images have relative "
                  f"attribution >= {tau}; column means D1/orig={m[0]:.4f} D2/orig={m[1]:.4f} R/orig={m[2]:.4f}"
                  + (f" | all runs in the file: {on} images, {om[0]:.4f} {om[1]:.4f} {om[2]:.4f}"
                     if om is not None else ""))
        print(f"wrote {folder}/quantitative_concept{{1,2}}_required{tau}.txt and means_required{tau}.txt")

    if args.get_top_images:
        from utils import plots  # matplotlib: only for a run that draws
        scan, orig_pos, maps_pos = whole_val or (list(r["index"]), r["orig_pos"], r["maps_pos"])
        rows, top = [], {}
        for label, score in (("Original", orig_pos), ("Disentangled 1", maps_pos[:, 0]),
                             ("Disentangled 2", maps_pos[:, 1])):
            pick = [scan[i] for i in evaluation.top_k(score, args.top_k)]
            top[label] = pick
            rows.append((label, [(ds.samples[i][0], names[ds.targets[i]]) for i in pick]))
        scope = "all val images" if args.top_images_all_val else "val images of both concepts"
        for fname in ("top_images.png", f"{run_name}_top_images.png"):
            plots.contact_sheet(os.path.join(out, "plots", fname), rows,
                                title=f"{ctx.tag} {ctx.layer_path} channel {c}: top {args.top_k} of {scope} by pos(map)")
        summary["top_images"] = {k: [ds.samples[i][0] for i in v] for k, v in top.items()}
        print(f"wrote {out}/plots/top_images.png")

    if args.get_feature_vis:
        summary["feature_vis"] = featurevis.run_for_checkpoint(ctx, args, sd, c, s1, s2, run_name, out)["figure"]

    if args.get_sae_view:
        summary["sae_view"] = sae_view.run_for_channel(ctx, args, c, s1 + s2, run_name, out)["figure"]

    fileio.write_json(os.path.join(out, "results_disentanglement", f"{run_name}_summary.json"), summary)


if __name__ == "__main__":
    cli.run(main)
