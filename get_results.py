r"""Stage 4: how well a disentangled channel separates its two concepts, on the val images.

Example (the paper's quantitative table uses tau = 0.03):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --channel_of_interest 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938 --get_qualitative --get_quantitative
"""
import argparse
import os

import numpy as np
import torch

from utils import cli, context, data, evaluation, fileio, store
from utils.disentangle import checkpoint_name


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p, store=False)
    p.add_argument("--model_dir", required=True,
                   help="the --store_dir of stage 3 (holding models_disentangled/)")
    p.add_argument("--channel_of_interest", type=int, required=True, help="the disentangled channel")
    p.add_argument("--classes_for_concept1", nargs="+", required=True, help="class indices of concept 1")
    p.add_argument("--classes_for_concept2", nargs="+", required=True, help="class indices of concept 2")
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
    p.add_argument("--out_dir", default=".",
                   help="folder for plots/, results_disentanglement/, results_quantitative/ (default: working directory)")
    args = p.parse_args()
    s1 = cli.parse_classes(args.classes_for_concept1, "--classes_for_concept1")
    s2 = cli.parse_classes(args.classes_for_concept2, "--classes_for_concept2")
    c, tau = args.channel_of_interest, args.proportion_attribution_required
    if args.top_k < 1:
        raise cli.UserError("--top_k must be at least 1")

    ctx = context.setup(args, split="val")
    context.check_channel(ctx, c, "--channel_of_interest")
    context.check_concepts(ctx.dataset, s1, s2)
    rho = "best" if args.f is None else args.f
    name = checkpoint_name(ctx.tag, c, s1, s2, rho)
    path = find_checkpoint(args.model_dir, name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise cli.UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})")
    info = check_checkpoint(ctx, sd, c, path, data.dataset_summary(ctx.dataset))
    filters, bias = evaluation.checkpoint_filters(sd)

    ds = ctx.dataset
    for flag, classes in (("--classes_for_concept1", s1), ("--classes_for_concept2", s2)):
        if not data.indices_of_classes(ds, classes):
            raise cli.UserError(f"{flag}: no val images of classes {classes} under {args.data_dir}/val")
    indices = data.indices_of_classes(ds, s1 + s2)
    workers = cli.default_workers(args.num_workers)
    r = evaluation.evaluate(ctx.model, ctx.conv, c, filters, bias, ds, indices, args.batch_size, ctx.device, workers)
    concept = np.where(np.isin(r["label"], s1), 1, 2)
    names = ds.classes
    label_of = {1: ", ".join(names[y] for y in s1), 2: ", ".join(names[y] for y in s2)}
    run_name = name[:-len(".pth")]
    out = args.out_dir
    summary = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": c, "classes1": s1, "classes2": s2,
               "class_names1": [names[y] for y in s1], "class_names2": [names[y] for y in s2],
               "checkpoint": path, "rho": info["best_rho"] if (info and rho == "best") else rho,
               "max_logit_diff": info.get("max_logit_diff") if info else None}
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
        from utils import plots
        if args.top_images_all_val:
            scan = list(range(len(ds)))
            orig_pos, maps_pos = evaluation.scan_activations(ctx.model, ctx.conv, c, filters, bias, ds, scan,
                                                             args.batch_size, ctx.device, workers)
        else:
            scan, orig_pos, maps_pos = indices, r["orig_pos"], r["maps_pos"]
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

    fileio.write_json(os.path.join(out, "results_disentanglement", f"{run_name}_summary.json"), summary)


if __name__ == "__main__":
    cli.run(main)
