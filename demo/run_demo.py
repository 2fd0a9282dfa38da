"""The no-ImageNet demo: generate shapes, train a small CNN, then find and split a polysemantic channel.

Steps (all on the CPU):
  1. draw the textured-shapes data set (demo/shapes_data.py) into OUT/data/{train,val}
  2. train the demo CNN (demo/model.py, demo/train.py) into OUT/model.pth
  3. run the four stage scripts through their command lines, exactly as a user would:
       get_importances_for_classes.py  (stage 1, on train)
       get_cosine_similarities.py      (stage 2, with the demo's thresholds)
       disentangle_channel.py          (stage 3, on the strongest candidate: the lowest cosine)
       get_results.py                  (stage 4, on val: --get_qualitative --get_quantitative --get_top_images)
       and, on the same checkpoint, --get_feature_vis (MACO, at the demo's small settings below)
       get_cosine_similarities.py --label_free  (the chosen channel's concepts found without class labels)
       disentangle_channel.py and get_results.py --candidates --top 3 (the three strongest channels in one
       run each, small feature visualizations, into OUT/candidates) with --atlas OUT/atlas (skip: --no_atlas)
  4. print a short report and write OUT/report.json

Usage: python -m demo.run_demo [--out demo_out] [--arch cnn|resnet] [--train_per_class 100] [--epochs 20] ...
(--arch resnet: the layer is the last 1x1 conv of a bottleneck block, followed by a BatchNorm and the
residual add, the paper's layout; see demo/model.py)
"""
import argparse
import json
import os
import time

from demo.networks import SHAPES_SPECS as MODELS  # --arch -> --model (the layer: each net's last conv)
from demo.runner import Runner, Stages, clean, short, strongest_first
from utils.files import atomic, names as file_names

MODEL = MODELS["cnn"]
# what the demo writes into OUT (removed at the start of a run, so each run starts clean)
MADE_HERE = ("data", "store", "plots", "results_disentanglement", "results_quantitative",
             "results_get_cosine_similarities", "logs", "model.pth", "model_training.json", "report.json",
             "candidates", "atlas")
ATLAS_TOP = 3  # channels of the atlas step
ATLAS_FV = (("--fv_size", 64), ("--fv_steps", 8), ("--fv_crops", 2), ("--fv_spectrum_images", 16))  # at most


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--arch", choices=sorted(MODELS), default="cnn",
                   help="demo net: cnn (default; conv -> ReLU after the layer) or resnet (conv -> BatchNorm -> "
                        "residual add -> ReLU after it, as in ResNet-50)")
    p.add_argument("--train_per_class", type=int, default=100, help="training images per class (default 100)")
    p.add_argument("--val_per_class", type=int, default=30, help="val images per class (default 30)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (default 0)")
    p.add_argument("--aux_weight", type=float, default=None,
                   help="weight of the training-only classifier on the layer's input (default: demo/train.py's "
                        "AUX_WEIGHT; 0: none)")
    p.add_argument("--train_threads", type=int, default=None,
                   help="torch threads while training (default: demo/train.py's THREADS, 2, or 1 on a one-core "
                        "machine); another count rounds differently, as another CPU does")
    p.add_argument("--batch_size", type=int, default=64, help="--batch_size of the stage scripts (default 64)")
    p.add_argument("--num_workers", type=int, default=None, help="--num_workers of the stage scripts")
    p.add_argument("--proportion_attribution_required", type=float, default=0.1,
                   help="stage 2 tau: a channel is important for an image if it has this share of the "
                        "positive attribution (default 0.1: the layer has only a few channels)")
    p.add_argument("--p", type=float, default=0.75,
                   help="stage 2: a channel uses a class if it is important for this share of its images (default 0.75)")
    p.add_argument("--cos_sim_low", type=float, default=0.0, help="stage 2 lowest cosine kept (default 0)")
    p.add_argument("--cos_sim_high", type=float, default=0.8, help="stage 2 cosine bound (default 0.8)")
    p.add_argument("--quantitative_tau", type=float, default=0.03,
                   help="stage 4 --proportion_attribution_required (default 0.03, the paper's)")
    p.add_argument("--top_k", type=int, default=8, help="images per row of the contact sheet (default 8)")
    p.add_argument("--fv_size", type=int, default=128, help="stage 4 --fv_size (default 128: the demo's time budget)")
    p.add_argument("--fv_steps", type=int, default=64, help="stage 4 --fv_steps (default 64)")
    p.add_argument("--fv_crops", type=int, default=6, help="stage 4 --fv_crops (default 6)")
    p.add_argument("--fv_spectrum_images", type=int, default=128, help="stage 4 --fv_spectrum_images (default 128)")
    p.add_argument("--no_feature_vis", action="store_true", help="skip the feature visualizations")
    p.add_argument("--no_atlas", action="store_true",
                   help="skip the last step (stages 3 and 4 with --candidates --top 3, and the atlas)")
    return p.parse_args(argv)


def label_free(stages, channel, top_n=100):
    """Label-free concepts of ``channel`` through stage 2's command line (--label_free); the report's entry:
    k, silhouette, each cluster's size and class counts, and the cluster purity (the fraction of the top-N
    training images that belong to their cluster's most common class)."""
    print(short(stages.label_free(channel, top_n), 8))
    path = stages.concepts(top_n)
    with open(path) as f:
        rec = json.load(f)["channels"][str(channel)]
    return {"channel": channel, "top_n": len(rec["top_rows"]), "k": rec["k"], "silhouette": rec["silhouette"],
            "sign": rec["sign"], "purity": rec["purity"], "concepts_json": path,
            "clusters": [{"size": cl["size"], "classes": cl["classes"], "purity": cl["purity"]} for cl in rec["clusters"]]}


def atlas_step(stages, cand_path, args):
    """Stages 3 and 4 with ``--candidates`` on the strongest channels (the demo's channel is skipped by stage 3:
    its files are complete), then the atlas of their runs; the report's entry."""
    with open(cand_path) as f:
        top = min(ATLAS_TOP, len({d["channel"] for d in json.load(f)["candidates"]}))
    print(f"[+] the {top} strongest channels in one run of stages 3 and 4, and their atlas", flush=True)
    sel = ["--candidates", cand_path, "--top", top]
    r, common, store_dir, out = stages.runner, stages.common, stages.store_dir, stages.out
    print(short(r.run("stage3_candidates", "disentangle_channel.py", common + ["--store_dir", store_dir] + sel), 2))
    fv = [] if args.no_feature_vis else ["--get_feature_vis"] + [
        str(v) for flag, most in ATLAS_FV for v in (flag, min(most, getattr(args, flag[2:])))]
    folder, results = os.path.join(out, "atlas"), os.path.join(out, "candidates")
    text = r.run("stage4_candidates", "get_results.py", common + ["--model_dir", store_dir] + sel + [
        "--get_qualitative", "--get_quantitative", "--get_top_images", "--top_k", args.top_k,
        "--proportion_attribution_required", args.quantitative_tau, "--out_dir", results, "--atlas", folder] + fv)
    print(short(text, 1))
    from utils.atlas.write import folder_bytes
    with open(file_names.atlas_record(folder)) as f:
        record = json.load(f)
    return {"channels": top, "index": file_names.atlas_index(folder), "results": results,
            "bytes": folder_bytes(folder), "own_bytes": folder_bytes(folder, own=True),
            "runs": len(record["rows"])}


def label_free_lines(rep):
    """The printed report's line on the label-free concepts (none if the report has no such entry)."""
    lf = rep.get("label_free")
    if not lf:
        return []
    sil = "undefined" if lf["silhouette"] is None else f"{lf['silhouette']:.2f}"
    clusters = "; ".join(f"{cl['size']}: " + ", ".join(f"{name} {n}" for name, n in list(cl["classes"].items())[:3])
                         for cl in lf["clusters"])
    return [f"without labels: the top {lf['top_n']} training images of channel {lf['channel']} form k = {lf['k']} "
            f"clusters (silhouette {sil}), purity {lf['purity']:.2f} [{clusters}]"]


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    clean(out, MADE_HERE)
    from demo import shapes_data, train

    data_dir, store_dir = os.path.join(out, "data"), os.path.join(out, "store")
    weights = os.path.join(out, "model.pth")
    print(f"[1/6] drawing the data set into {data_dir}", flush=True)
    t = time.time()
    names = shapes_data.generate(data_dir, args.train_per_class, args.val_per_class, args.seed)
    seconds = {"data": round(time.time() - t, 1)}
    print(f"  {len(names)} classes x ({args.train_per_class} train + {args.val_per_class} val) images: "
          f"{', '.join(names)}")

    print(f"[2/6] training the demo CNN ({args.epochs} epochs)", flush=True)
    t = time.time()
    options = {k: v for k, v in (("aux_weight", args.aux_weight), ("threads", args.train_threads)) if v is not None}
    training = train.train(data_dir, weights, epochs=args.epochs, seed=args.seed, log=lambda s: print("  " + s, flush=True),
                           arch=args.arch, **options)
    seconds["train"] = round(time.time() - t, 1)

    r = Runner(out)
    model = MODELS[args.arch]
    common = ["--data_dir", data_dir, "--model", model, "--weights", weights, "--batch_size", args.batch_size]
    if args.num_workers is not None:
        common += ["--num_workers", args.num_workers]
    stages = Stages(r, common, store_dir, out, model)
    print("[3/6] stage 1: attributions and patch sums of every training image", flush=True)
    print(short(stages.stage1(), 2))

    tau, pp, low, high = (float(args.proportion_attribution_required), float(args.p),
                          float(args.cos_sim_low), float(args.cos_sim_high))
    print("[4/6] stage 2: gamma-polysemantic candidates", flush=True)
    print(short(stages.stage2(tau, pp, low, high), 2))
    cand_path = stages.candidates(tau, pp, low, high)
    with open(cand_path) as f:
        cands = json.load(f)["candidates"]
    if not cands:
        raise SystemExit(f"stage 2 found no candidate (tau={tau}, p={pp}, {low} <= cosine < {high}): "
                         f"train longer or loosen the thresholds")
    # the strongest candidate: the lowest cosine between the two classes' relevance vectors
    ranked = strongest_first(cands)
    best = ranked[0]
    c, y1, y2 = best["channel"], best["class1"], best["class2"]
    head = [dict(d, class1_name=names[d["class1"]], class2_name=names[d["class2"]],
                 cosine_similarity=round(d["cosine_similarity"], 4)) for d in ranked[:10]]
    print(f"  strongest candidate: channel {c}, {names[y1]} (class {y1}) vs {names[y2]} (class {y2}), "
          f"cosine {best['cosine_similarity']:.4f}")

    print("[5/6] stage 3: disentangling it", flush=True)
    print(short(stages.stage3("stage3", c, y1, y2), 4))

    print("[6/6] stage 4: evaluation on the val images" + ("" if args.no_feature_vis else
                                                            ", and the feature visualizations"), flush=True)
    fv = [] if args.no_feature_vis else [
        "--get_feature_vis", "--fv_size", args.fv_size, "--fv_steps", args.fv_steps, "--fv_crops", args.fv_crops,
        "--fv_spectrum_images", args.fv_spectrum_images]
    print(short(stages.stage4("stage4", c, y1, y2, args.top_k, args.quantitative_tau, fv), 6))

    files = stages.split_files(c, y1, y2)
    with open(files.summary) as f:
        summary = json.load(f)
    info_path = files.info
    with open(info_path) as f:
        info = json.load(f)
    print("[+] the same channel's concepts without class labels (stage 2 --label_free)", flush=True)
    free = label_free(stages, c)
    atlas = None if args.no_atlas else atlas_step(stages, cand_path, args)
    seconds.update(r.seconds)
    fv_record = None
    if not args.no_feature_vis:
        with open(files.feature_vis) as f:
            fv_record = json.load(f)
    report = {
        "arch": args.arch, "channel": c, "class1": names[y1], "class2": names[y2], "class1_index": y1, "class2_index": y2,
        "layer": summary["layer"], "cosine_similarity": best["cosine_similarity"],
        "best_rho": info["best_rho"],
        "sep_concept1": summary["sep_concept1"], "sep_concept2": summary["sep_concept2"],
        "mean_pos_concept1": summary["mean_pos_concept1"], "mean_pos_concept2": summary["mean_pos_concept2"],
        "quantitative_concept1": summary.get("quantitative_concept1"),
        "quantitative_concept2": summary.get("quantitative_concept2"),
        "max_logit_diff": info["max_logit_diff"], "logits_unchanged": info["exact"],
        "val_images_concept1": summary["val_images_concept1"], "val_images_concept2": summary["val_images_concept2"],
        "num_candidates": len(cands), "candidates_head": head, "candidates_json": cand_path,
        "stage2_thresholds": {"proportion_attribution_required": tau, "p": pp, "cos_sim_low": low, "cos_sim_high": high},
        "training": {k: training[k] for k in ("epochs", "seed", "aux_weight", "threads", "train_images", "val_images",
                                             "train_accuracy", "val_accuracy")},
        "plots": dict(files.latest_plots, rho_scores=files.scores),
        "top_images": summary.get("top_images"),
        "feature_vis_png": None if fv_record is None else fv_record["figure"],
        "feature_vis_json": None if fv_record is None else files.feature_vis,
        "feature_vis_targets": None if fv_record is None else fv_record["targets"],
        "activation": None if fv_record is None else fv_record["activation"],
        "val_max": None if fv_record is None else fv_record["val_max"],
        "feature_vis_settings": None if fv_record is None else {
            k: fv_record[k] for k in ("size", "steps", "crops", "seed", "seconds")},
        "label_free": free,
        **({} if atlas is None else {"atlas": atlas}),
        "summary_json": files.summary,
        "info_json": info_path, "commands": r.commands, "stage_seconds": seconds,
        "seconds": round(time.time() - start, 1),
    }
    atomic.write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    print_report(report, out)
    return report


def print_report(rep, out):
    q1, q2 = rep["quantitative_concept1"] or {}, rep["quantitative_concept2"] or {}
    m1, m2 = rep["mean_pos_concept1"], rep["mean_pos_concept2"]
    lines = [
        "",
        "=" * 78,
        f"Demo report ({rep['seconds']:.0f} s in all; val accuracy of the trained CNN "
        f"{rep['training']['val_accuracy']:.1%})",
        f"stage 2 found {rep['num_candidates']} candidates; the five with the lowest cosine:",
        *[f"  channel {d['channel']}: {d['class1_name']} vs {d['class2_name']} (cosine {d['cosine_similarity']:.3f})"
          for d in rep["candidates_head"][:5]],
        f"chosen: channel {rep['channel']} of {rep['layer']}, concept 1 = {rep['class1']}, "
        f"concept 2 = {rep['class2']}; best rho = {rep['best_rho']}",
        f"val images of concept 1 ({rep['val_images_concept1']}): mean pos(D1) = {m1['D1']:.3g}, "
        f"mean pos(D2) = {m1['D2']:.3g}  ->  sep_concept1 = {rep['sep_concept1']:.3g}",
        f"val images of concept 2 ({rep['val_images_concept2']}): mean pos(D2) = {m2['D2']:.3g}, "
        f"mean pos(D1) = {m2['D1']:.3g}  ->  sep_concept2 = {rep['sep_concept2']:.3g}",
        f"quantitative (column means D1/orig, D2/orig, R/orig): concept 1 "
        f"{q1.get('D1/orig', float('nan')):.3f} {q1.get('D2/orig', float('nan')):.3f} {q1.get('R/orig', float('nan')):.3f} "
        f"({q1.get('images', 0)} images), concept 2 "
        f"{q2.get('D1/orig', float('nan')):.3f} {q2.get('D2/orig', float('nan')):.3f} {q2.get('R/orig', float('nan')):.3f} "
        f"({q2.get('images', 0)} images)",
        f"max |logit difference| original vs disentangled: {rep['max_logit_diff']:.3g} "
        f"({'same function' if rep['logits_unchanged'] else 'NOT the same function'})",
        *feature_vis_lines(rep),
        *label_free_lines(rep),
        "plots: " + ", ".join(os.path.relpath(p, os.getcwd()) if p.startswith(os.getcwd()) else p
                              for p in rep["plots"].values()),
        *([] if rep.get("atlas") is None else [f"atlas of the {rep['atlas']['channels']} strongest channels: "
                                               f"{rep['atlas']['index']} ({rep['atlas']['bytes'] / 1e6:.2f} MB, "
                                               f"{rep['atlas']['own_bytes'] / 1e6:.2f} MB of its own)"]),
        f"report: {os.path.join(out, 'report.json')}",
        "=" * 78,
    ]
    print("\n".join(lines))


def feature_vis_lines(rep):
    """The activation matrix of the feature visualizations (row: visualization, column: target), or nothing."""
    if rep.get("activation") is None:
        return []
    names = rep["feature_vis_targets"]
    lines = ["feature visualizations (rows: the image optimized for ..., columns: mean activation of ...):",
             "  " + " " * 14 + "".join(f"{n:>10}" for n in names)]
    lines += ["  " + f"{n:<14}" + "".join(f"{v:10.3g}" for v in row) for n, row in zip(names, rep["activation"])]
    lines.append("  " + f"{'val max':<14}" + "".join(f"{v:10.3g}" for v in rep["val_max"]))
    return lines


if __name__ == "__main__":
    main()
