r"""Stage 4: how well a disentangled channel separates its concepts (two, or k), on the val images.

Example (the paper's quantitative table uses tau = 0.03):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --channel_of_interest 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938 --get_qualitative --get_quantitative

All the paper's triples in one process (one model load, one pass over the union of their val images;
the files are those of one run per triple in file order, byte for byte):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --triples paper_triples.txt \
      --get_quantitative --proportion_attribution_required 0.03

A k-way checkpoint (k is read from it): the same concepts as given to stage 3, e.g.
  python get_results.py ... --channel_of_interest 1660 --classes_for_concept1 530 --classes_for_concept2 938 \
      --classes_for_concept3 409 892 --get_qualitative --get_quantitative
  python get_results.py ... --channel_of_interest 1660 --concepts_file \
      /data/store/results_get_cosine_similarities/resnet50_concepts_top100.json --clusters 0 2 --get_quantitative
"""
import os

import numpy as np
import torch

from utils.run import cli
from utils.concepts import by_clusters
from utils.run import context
from utils.data import folders
from utils import disentangle
from utils.stages import stage4
from utils.featurevis import render
from utils.files import atomic
from utils.stages import sae_view
from utils.files import store
from utils.concepts.by_classes import MORE_CONCEPTS, check_no_classes_with_file, check_triples, class_jobs, union_classes


def find_checkpoint(model_dir, name):
    for folder in (os.path.join(model_dir, "models_disentangled"), model_dir):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise cli.UserError(f"checkpoint {name} not found in {model_dir}/models_disentangled: run "
                        f"disentangle_channel.py with the same channel, concepts and --store_dir first "
                        f"(--model_dir is that --store_dir)")


def check_checkpoint(ctx, sd, channel, path, val_summary, k=None, concepts_sha256=None):
    """Refuse a checkpoint that does not belong to this model, layer and channel, or whose number of concepts
    (read from it) is not ``k``; with ``concepts_sha256``, one made from another concepts file."""
    w = ctx.conv.weight[channel].detach()
    problem = disentangle.checkpoint_problem(sd, ctx.conv)
    if problem:
        raise cli.UserError(f"{path}: {problem} for layer '{ctx.layer_path}' (--layer_of_interest "
                            f"{ctx.layer_path}): the checkpoint was made for another layer; pass its "
                            f"--layer_of_interest")
    D = sd["disentangled.weight"]
    n = disentangle.concepts_of_checkpoint(sd)
    if k is not None and n != k:
        raise cli.UserError(f"{path} splits into {n} concepts, not the {k} given")
    merged = D[0] + D[1] if n == 2 else D[:n].sum(dim=0)
    merged = merged - (D[n] if n == 2 else (n - 1) * D[n])
    if not torch.allclose(merged, w.cpu(), atol=1e-6, rtol=1e-5):
        what = "D1 + D2 - R" if n == 2 else f"D1 + ... + D{n} - {n - 1} R"
        raise cli.UserError(f"{path}: {what} differs from channel {channel}'s filter of layer '{ctx.layer_path}': "
                            f"the checkpoint was made for another model, weights, layer or channel")
    info_path = path[:path.rfind("_f")] + "_info.json"
    if os.path.isfile(info_path):
        info = atomic.read_json(info_path)
        expected = dict(ctx.fingerprint, classes=val_summary["classes"])
        diff = store.describe_mismatch(info, expected, ("model", "weights_sha256", "layer", "layer_geometry"))
        if info.get("classes") != val_summary["classes"]:  # train classes of the store against the val folders
            stored, now = info.get("classes") or [], val_summary["classes"]
            odd = sorted(set(stored) ^ set(now))
            diff = "; ".join(x for x in (diff, f"classes (the store's training split has {len(stored)} class folders, "
                                               f"the val split {len(now)}; first differing folder: "
                                               f"{odd[0] if odd else 'same names, other order'})") if x)
        if diff:
            raise cli.UserError(f"{path} was made with other settings: {diff}")
        if concepts_sha256 is not None and info.get("concepts_sha256") not in (None, concepts_sha256):
            raise cli.UserError(f"{path} was made from another concepts file (sha256 {info['concepts_sha256'][:12]}..., "
                                f"this one {concepts_sha256[:12]}...)")
        return info
    return None


def checkpoint_file_name(ctx, t, rho):
    return t.checkpoint(ctx.name, rho)


def load_checkpoint(ctx, args, t, rho, val_summary):
    """Find, read and check job ``t``'s checkpoint. Returns (path, name, state dict, info or None)."""
    name = checkpoint_file_name(ctx, t, rho)
    path = find_checkpoint(args.model_dir, name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise cli.UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})")
    k = t.k if isinstance(t, by_clusters.ClusterConcepts) else len(t.concepts)
    sha = t.sha256 if isinstance(t, by_clusters.ClusterConcepts) else None
    return path, name, sd, check_checkpoint(ctx, sd, t.channel, path, val_summary, k, sha)


def jobs_from_args(args):
    """Triples (classes; --triples, or the per-triple flags with --classes_for_concept3..6), or None when
    --concepts_file gives the concepts (read once the model is known)."""
    if args.concepts_file is not None:
        check_no_classes_with_file(args)
        if args.channel_of_interest is None:
            raise cli.UserError("--concepts_file needs --channel_of_interest (the channel whose clusters were used)")
        return None
    if args.clusters is not None or args.val_top_n is not None:
        raise cli.UserError(f"{'--clusters' if args.clusters is not None else '--val_top_n'} goes with "
                            f"--concepts_file: give the file too")
    return class_jobs(args, args.channel_of_interest, "--channel_of_interest", "evaluates")


def class_concepts(labels, concepts):
    """(N,) labels -> (N,) concept ids 1..k (the concept whose classes hold the label; 0 for none)."""
    out = np.zeros(len(labels), dtype=np.int64)
    for j in range(len(concepts), 0, -1):
        out[np.isin(labels, concepts[j - 1])] = j
    return out


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store=False)
    p.add_argument("--model_dir", "--store_dir", dest="model_dir", default=None,
                   help="the --store_dir of stages 1-3 (holding models_disentangled/; required; also --store_dir)")
    p.add_argument("--channel_of_interest", "--channel_disentangle", dest="channel_of_interest", type=int,
                   default=None, help="the disentangled channel (required unless --triples; also --channel_disentangle)")
    p.add_argument("--classes_for_concept1", nargs="+", default=None,
                   help="class indices of concept 1 (required unless --triples or --concepts_file)")
    p.add_argument("--classes_for_concept2", nargs="+", default=None,
                   help="class indices of concept 2 (required unless --triples or --concepts_file)")
    for j in MORE_CONCEPTS:
        p.add_argument(f"--classes_for_concept{j}", nargs="+", default=None,
                       help=(f"class indices of concept {j} of a k-way checkpoint (k = 3 .. 6, as given to stage 3)"
                             if j == 3 else f"class indices of concept {j} (see --classes_for_concept3)"))
    p.add_argument("--triples", default=None,
                   help="file of 'channel classes1 classes2' lines (as paper_triples.txt; several classes as "
                        "1,2): evaluate every triple in one process, writing what one run per triple in file "
                        "order writes, instead of the three flags above")
    p.add_argument("--concepts_file", default=None,
                   help="the concepts file stage 3 split --channel_of_interest by: the val images of concept j are "
                        "those of the channel's top --val_top_n val images (by summed activation) whose ARV is "
                        "nearest to cluster j's centroid")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the clusters given to stage 3 (default: all the channel's clusters)")
    p.add_argument("--val_top_n", type=int, default=None,
                   help="with --concepts_file: how many top val images to assign to clusters (default: the file's "
                        "top_n, at most the number of val images)")
    p.add_argument("--f", type=float, default=None, help="rho of the checkpoint to evaluate (default: best)")
    p.add_argument("--get_qualitative", action="store_true", help="density plots and their data files")
    p.add_argument("--get_quantitative", action="store_true",
                   help="D1/orig, D2/orig, R/orig per image (D1/orig .. Dk/orig, R/orig for k concepts)")
    p.add_argument("--proportion_attribution_required", type=float, default=0.03,
                   help="tau: images whose relative attribution to the channel is >= tau count (default 0.03, "
                        "the paper's quantitative tau; stage 2's default is 0.05)")
    p.add_argument("--get_top_images", action="store_true",
                   help="contact sheet of the val images activating the original channel and each D_j the most")
    p.add_argument("--top_k", type=int, default=8, help="images per row of the contact sheet (default 8)")
    p.add_argument("--top_images_all_val", action="store_true",
                   help="scan the whole val split for the top images (default: the concepts' val images)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave val images whose files cannot be decoded out of every number (default: stop "
                        "with a message naming the file)")
    p.add_argument("--out_dir", default=".",
                   help="folder for plots/, results_disentanglement/, results_quantitative/ (default: working directory)")
    render.add_args(p)  # --get_feature_vis and its --fv_* flags
    sae_view.add_args(p)  # --get_sae_view and its --sae_* flags
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "model_dir")
    triples = jobs_from_args(args)
    if not 0 <= args.proportion_attribution_required <= 1:
        raise cli.UserError(f"--proportion_attribution_required {args.proportion_attribution_required}: tau is a "
                            f"share of the positive attribution, in [0, 1] (the paper's 0.03; 0 counts every image)")
    if args.top_k < 1:
        raise cli.UserError("--top_k must be at least 1")
    if args.val_top_n is not None and args.val_top_n < 1:
        raise cli.UserError("--val_top_n must be at least 1")

    ctx = context.setup(args, split="val", store_flag="model_dir")
    if triples is None:
        context.check_channel(ctx, args.channel_of_interest, "--channel_of_interest")
        triples = [by_clusters.read_concepts_file(args.concepts_file, ctx.fingerprint, args.channel_of_interest,
                                               args.clusters, keys=by_clusters.MODEL_KEYS)]
    else:
        check_triples(ctx, triples, "--channel_of_interest")
    sae_view.check_args(args, ctx.conv)
    ds = ctx.dataset
    rho = "best" if args.f is None else args.f
    summary_of_val = folders.dataset_summary(ds)
    checkpoints = [load_checkpoint(ctx, args, t, rho, summary_of_val) for t in triples]
    clustered = isinstance(triples[0], by_clusters.ClusterConcepts)
    if not clustered:
        for t in triples:
            for k, classes in enumerate(t.concepts, start=1):
                if not folders.indices_of_classes(ds, classes):
                    where = f"{t.where}: concept {k}" if t.where else f"--classes_for_concept{k}"
                    raise cli.UserError(f"{where}: no val images of classes {classes} under {args.data_dir}/val")

    workers = cli.default_workers(args.num_workers)
    unreadable = "skip" if args.skip_unreadable else "error"
    hint = ": replace or remove the file, or pass --skip_unreadable to leave it out"
    filters = [stage4.checkpoint_filters(sd) for _, _, sd, _ in checkpoints]
    val_concept = None
    if clustered:  # the val images of each cluster: a forward pass up to the layer over all val images
        t = triples[0]
        n_top = min(args.val_top_n or t.top_n or len(ds), len(ds))
        scanned, summed, arvs = stage4.scan_arvs(ctx.model, ctx.conv, t.channel, ds, list(range(len(ds))),
                                                     args.batch_size, ctx.device, workers, unreadable, hint)
        ids = by_clusters.assign_val_concepts(summed, arvs, t.sign, n_top, t.centroids, t.clusters)
        val_concept = {int(i): int(j) for i, j in zip(scanned, ids) if j > 0}
        indices = sorted(val_concept)
        print(f"concepts of the val images: the top {n_top} of {len(scanned)} val images by "
              f"{'most negative ' if t.sign < 0 else ''}summed activation of channel {t.channel}, by the nearest of "
              f"its {len(t.centroids)} cluster centroids: "
              + ", ".join(f"cluster {cl}: {int((ids == j).sum())}" for j, cl in enumerate(t.clusters, start=1)))
        runs = [(t.channel, f, b, list(range(len(ds.classes)))) for t, (f, b) in zip(triples, filters)]
    else:
        # one forward and head-only backward over the val images of every triple's classes, each image once
        indices = folders.indices_of_classes(ds, union_classes(triples))
        runs = [(t.channel, f, b, t.classes) for t, (f, b) in zip(triples, filters)]
    results = stage4.evaluate_many(ctx.model, ctx.conv, runs, ds, indices, args.batch_size, ctx.device, workers,
                                       unreadable=unreadable, hint=hint, class_outputs=ctx.class_outputs)
    scans = [None] * len(triples)
    if args.get_top_images and args.top_images_all_val:
        scanned, pos = stage4.scan_many(ctx.model, ctx.conv, [(t.channel, f, b) for t, (f, b) in
                                                                  zip(triples, filters)],
                                            ds, list(range(len(ds))), args.batch_size, ctx.device, workers,
                                            unreadable=unreadable, hint=hint)
        scans = [(scanned, o, m) for o, m in pos]
    concepts = []
    for t, r in zip(triples, results):  # every job checked before anything is written
        if clustered:
            concept = np.asarray([val_concept[int(i)] for i in r["index"]], dtype=np.int64)
        else:
            concept = class_concepts(r["label"], t.concepts)
        k = t.k if clustered else len(t.concepts)
        for j in range(1, k + 1):
            if not (concept == j).any():
                what = (f"concept {j} (cluster {t.clusters[j - 1]}): none of the top val images is nearest to its "
                        f"centroid; pass a larger --val_top_n" if clustered else
                        f"concept {j}: none of its val images could be read")
                raise cli.UserError(f"{t.where + ': ' if getattr(t, 'where', '') else ''}{what}")
        concepts.append(concept)
    for t, (path, name, sd, info), r, scan, concept in zip(triples, checkpoints, results, scans, concepts):
        if args.triples is not None:
            print(f"=== {t.where}: channel {t.channel}, classes {t.classes1} vs {t.classes2}")
        write_results(args, ctx, t, rho, path, name, sd, info, r, scan, concept)


def write_results(args, ctx, t, rho, path, name, sd, info, r, whole_val, concept):
    """Print and write one job's results: what one run of this script for ``t`` alone writes.

    r: its numbers from ``stage4.evaluate_many``; whole_val: its (indices, orig_pos, maps_pos) from the
    whole-val scan for the top images, or None; concept: (N,) concept id 1..k of each of r's images. k is read
    from the checkpoint: one density curve per map, one quantitative column per map, one contact-sheet row per
    map. For two concepts given as classes, every file is what the published-format path has always written.
    """
    ds, c, tau = ctx.dataset, t.channel, args.proportion_attribution_required
    k = disentangle.concepts_of_checkpoint(sd)
    clustered = isinstance(t, by_clusters.ClusterConcepts)
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable val images: "
              + ", ".join(folders.relative_name(ds, i) for i in r["skipped"][:5])
              + (", ..." if len(r["skipped"]) > 5 else ""))
    names = ds.classes
    if clustered:
        label_of = {j: f"cluster {t.clusters[j - 1]}" for j in range(1, k + 1)}
        what = {"clusters": t.clusters, "concepts_file": os.path.abspath(t.path), "concepts_sha256": t.sha256,
                "val_top_n": min(args.val_top_n or t.top_n or len(ds), len(ds))}
    else:
        label_of = {j: ", ".join(names[y] for y in t.concepts[j - 1]) for j in range(1, k + 1)}
        what = {**{f"classes{j}": t.concepts[j - 1] for j in range(1, k + 1)},
                **{f"class_names{j}": [names[y] for y in t.concepts[j - 1]] for j in range(1, k + 1)}}
    run_name = name[:-len(".pth")]
    out = args.out_dir
    # the files without the run's name: the published ones for the model's last conv, the layer's own otherwise
    latest = "" if ctx.name == ctx.tag else f"_{ctx.name}"
    registry = "" if ctx.name == ctx.tag else f"{ctx.name}_"
    map_names = stage4.map_names(k)
    summary = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": c, **what,
               "checkpoint": path, "rho": info["best_rho"] if (info and rho == "best") else rho,
               "max_logit_diff": info.get("max_logit_diff") if info else None,
               "unreadable_val_images": [folders.relative_name(ds, i) for i in r["skipped"]]}
    for j in range(1, k + 1):
        sel = concept == j
        mp = r["maps_pos"][sel]
        others = [m for m in range(k) if m != j - 1]
        summary[f"val_images_concept{j}"] = int(sel.sum())
        summary[f"sep_concept{j}"] = (float(mp[:, j - 1].mean() / max(max(mp[:, m].mean() for m in others), 1e-12))
                                      if sel.any() else None)
        summary[f"mean_pos_concept{j}"] = {"original": float(r["orig_pos"][sel].mean()) if sel.any() else None,
                                           **{n: float(mp[:, i].mean()) if sel.any() else None
                                              for i, n in enumerate(map_names)}}
    print(f"channel {c} of layer '{ctx.layer_path}', checkpoint {os.path.basename(path)}")
    for j in range(1, k + 1):
        other = f"mean pos(D{3 - j})" if k == 2 else f"max over l != {j} of mean pos(D_l)"
        print(f"concept {j} ({label_of[j]}): {summary[f'val_images_concept{j}']} val images, "
              f"mean pos(D{j}) / {other} = {summary[f'sep_concept{j}']:.3g}")
    braces = "{" + ",".join(str(j) for j in range(1, k + 1)) + "}"

    if args.get_qualitative:
        from utils.report import plots  # matplotlib: only for a run that draws
        for j in range(1, k + 1):
            sel = concept == j
            curves = [(label, stage4.kde_curve(vals)) for label, vals in
                      zip(plots.curve_labels(k), [r["orig"][sel]] + [r["maps"][sel, i] for i in range(k)])]
            title = f"{ctx.tag} {ctx.layer_path} channel {c}, concept {j}: {label_of[j]}"
            for fname in (f"density_concept{j}{latest}.png", f"{run_name}_density_concept{j}.png"):
                plots.density_plot(os.path.join(out, "plots", fname), curves, title)
            blocks = [stage4.filecontents_block(f"{n}_c{j}", *cv) for n, (_, cv) in
                      zip(["original"] + [f"disentangled{i}" for i in range(1, k + 1)], curves) if cv is not None]
            atomic.write_text(os.path.join(out, "results_disentanglement", f"density_concept{j}{latest}.txt"),
                              "".join(blocks))
        print(f"wrote {out}/plots/density_concept{braces}{latest}.png and "
              f"{out}/results_disentanglement/density_concept{braces}{latest}.txt")

    if args.get_quantitative:
        rows = {j: stage4.quantitative_rows(r["maps"][concept == j], r["orig"][concept == j],
                                                r["rel"][concept == j], tau) for j in range(1, k + 1)}
        folder = os.path.join(out, "results_quantitative")
        overall = stage4.update_quantitative(folder, tau, run_name, rows,
                                                 {"model": ctx.model_spec, "layer": ctx.layer_path},
                                                 prefix=registry)
        columns = [f"{n}/orig" for n in map_names]
        for j in range(1, k + 1):
            m = rows[j].mean(axis=0) if len(rows[j]) else [float("nan")] * (k + 1)
            summary[f"quantitative_concept{j}"] = {"images": len(rows[j]),
                                                   **{col: float(v) for col, v in zip(columns, m)}}
            om, on = overall[j]
            print(f"concept {j}: {len(rows[j])} of {summary[f'val_images_concept{j}']} val images have relative "
                  f"attribution >= {tau}; column means " + " ".join(f"{col}={v:.4f}" for col, v in zip(columns, m))
                  + (f" | all runs in the file: {on} images, " + " ".join(f"{v:.4f}" for v in om)
                     if om is not None else ""))
        pre = registry + stage4.quantitative_prefix(k)
        print(f"wrote {folder}/quantitative_{pre}concept{braces}_required{tau}.txt and means_{pre}required{tau}.txt")

    if args.get_top_images:
        from utils.report import plots  # matplotlib: only for a run that draws
        scan, orig_pos, maps_pos = whole_val or (list(r["index"]), r["orig_pos"], r["maps_pos"])
        rows, top = [], {}
        for label, score in zip(plots.curve_labels(k), [orig_pos] + [maps_pos[:, i] for i in range(k)]):
            pick = [scan[i] for i in stage4.top_k(score, args.top_k)]
            top[label] = pick
            rows.append((label, [(ds.samples[i][0], names[ds.targets[i]]) for i in pick]))
        scope = ("all val images" if args.top_images_all_val else "val images of both concepts" if k == 2 and
                 not clustered else f"val images of the {k} concepts")
        for fname in (f"top_images{latest}.png", f"{run_name}_top_images.png"):
            plots.contact_sheet(os.path.join(out, "plots", fname), rows,
                                title=f"{ctx.tag} {ctx.layer_path} channel {c}: top {args.top_k} of {scope} by pos(map)",
                                resize=ctx.transform.resize, crop_size=ctx.transform.crop)
        summary["top_images"] = {key: [ds.samples[i][0] for i in v] for key, v in top.items()}
        print(f"wrote {out}/plots/top_images{latest}.png")

    if args.get_feature_vis:
        val_images = (list(r["index"]), concept) if clustered else None
        concept_lists = [[] for _ in range(k)] if clustered else t.concepts
        summary["feature_vis"] = render.run_for_checkpoint(ctx, args, sd, c, concept_lists, run_name, out,
                                                               val_images=val_images)["figure"]

    if args.get_sae_view:
        scope = None if clustered else [y for cl in t.concepts for y in cl]  # clusters: every val image
        summary["sae_view"] = sae_view.run_for_channel(ctx, args, c, scope, run_name, out)["figure"]

    atomic.write_json(os.path.join(out, "results_disentanglement", f"{run_name}_summary.json"), summary)


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
