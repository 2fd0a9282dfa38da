"""The whole method on real images: Fashion-MNIST, a small ResNet trained here, the four stage scripts.

Steps (all on the CPU; every stage through its command line, as a user would run it):
  1. the IDX files of Debian's dataset-fashion-mnist -> an ImageFolder (demo/fashion_mnist.py; kept when it
     already holds the same images)
  2. train the small ResNet (demo/fashion_model.py) into OUT/model.pth (kept when OUT/model_training.json
     records the same settings)
  3. get_importances_for_classes.py on train (stage 1), at the images' own size: --resize 28 --crop 28 and
     Fashion-MNIST's --mean / --std on every stage
  4. get_cosine_similarities.py (stage 2) with every pair listed (cosine in [0, 1)); the report counts the
     pairs below 0.5, 0.7 and 0.9
  5. disentangle_channel.py (stage 3) on the --splits strongest candidates (the lowest-cosine pair of each
     of the channels with the lowest cosines), and get_results.py (stage 4) on val for each:
     densities, D_j/orig, top images; for the strongest also the feature visualizations (small settings)
     and the SAE view (--get_sae_view)
  6. get_cosine_similarities.py --label_free on the split channels (concepts without class labels)
  7. OUT/report.json: every number, every command, seconds per part

Two recipes (the flags below override either):
  quick (default; 4.3 CPU-minutes, 18 minutes on a 2-core CPU at load 15): the net trained 2 epochs on 1,000 training images
        per class with 1 thread; stage 1 on 200 per class, stage 4 on 100 test images per class; 2 strong
        splits; feature visualizations of 32 steps; SAE 100 steps on 500 images
  --full (the run docs/real_images.md reports): 5 epochs on all 60,000 training images with 1 thread;
        stage 1 on 1,000 per class, stage 4 on all 10,000 test images; 3 strong splits and 2 weak ones;
        feature visualizations of 64 steps; SAE 1,000 steps on 2,000 images
Everything goes inside --out: the ImageFolder (OUT/data_<stage-1 per class>_<val per class>, kept when it
already holds the same images), the model, the store, the results and report.json.

Usage: python -m demo.run_fashion [--out fmnist_out/run] [--full] [--data_dir DIR] [--arch fashion_resnet16]
       [--epochs N] [--seed 0] [--train_per_class N] [--val_per_class N] [--splits N] [--no_feature_vis]
       [--no_sae_view]
"""
import argparse
import glob
import os
import shutil
import time

from demo import fashion_mnist, fashion_model
from demo.networks import fashion_spec
from demo.runner import ROOT, Runner, Stages, clean, short, strongest_first
from utils.files import atomic, names as file_names
from utils.run import cli

THRESHOLDS = (0.5, 0.7, 0.9)   # the report counts candidate pairs below each cosine
SIZE = 28                      # --resize and --crop: the images' own size
# the two recipes (None: all the images of the split); a flag given on the command line wins
RECIPES = {
    "quick": {"epochs": 2, "train_per_class": 1000, "store_per_class": 200, "val_per_class": 100, "train_threads": 1,
              "splits": 2, "weakest": 0, "fv_steps": 32, "fv_spectrum_images": 128, "sae_steps": 100,
              "sae_train_images": 500},
    "full": {"epochs": 5, "train_per_class": None, "store_per_class": 1000, "val_per_class": None, "train_threads": 1,
             "splits": 3, "weakest": 2, "fv_steps": 64, "fv_spectrum_images": 256, "sae_steps": 1000,
             "sae_train_images": 2000},
}
MADE_HERE = ("plots", "results_disentanglement", "results_quantitative", "results_get_cosine_similarities",
             "logs", "report.json")


def transform_flags(mean=fashion_mnist.MEAN, std=fashion_mnist.STD):
    """The input-transform flags of every stage: no resizing, Fashion-MNIST's normalization on all 3 channels."""
    return ["--resize", SIZE, "--crop", SIZE, "--mean"] + [mean] * 3 + ["--std"] + [std] * 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick, full = RECIPES["quick"], RECIPES["full"]

    def recipe(key):  # the help's default of a recipe flag
        def n(v):
            return "all" if v is None else v
        return f"(quick: {n(quick[key])}; --full: {n(full[key])})"
    p.add_argument("--out", default=os.path.join(ROOT, "fmnist_out", "run"),
                   help="output folder: everything the run writes goes inside it")
    p.add_argument("--full", action="store_true",
                   help="the larger recipe of docs/real_images.md (all 60,000 training images, 5 epochs; there "
                        "training took 602 s and the stages of 3 splits 422 s at load 5-8 on 2 cores) instead of the quick one")
    p.add_argument("--data_dir", default=None,
                   help="the ImageFolder to write or reuse (default OUT/data_<store_per_class>_<val_per_class>)")
    p.add_argument("--source", default=None, help=f"folder of the IDX files (default {fashion_mnist.SOURCE})")
    p.add_argument("--arch", choices=sorted(fashion_model.ARCHS), default="fashion_resnet16",
                   help="the net (default fashion_resnet16: 16 channels, conv -> BatchNorm -> residual add)")
    p.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help=f"training epochs {recipe('epochs')}")
    p.add_argument("--seed", type=int, default=0, help="seed of the training (default 0)")
    p.add_argument("--train_threads", type=int, default=argparse.SUPPRESS,
                   help=f"torch threads while training {recipe('train_threads')}: 2 only on an idle machine (on busy "
                        f"cores 2 threads wait for each other); another count rounds differently")
    p.add_argument("--train_per_class", type=int, default=argparse.SUPPRESS,
                   help=f"training images per class, of 6000 {recipe('train_per_class')}")
    p.add_argument("--store_per_class", type=int, default=argparse.SUPPRESS,
                   help="training images per class in the ImageFolder that stage 1 reads "
                        f"{recipe('store_per_class')}; --train_per_class given alone: the same number")
    p.add_argument("--val_per_class", type=int, default=argparse.SUPPRESS,
                   help=f"val (test) images per class, of 1000 {recipe('val_per_class')}")
    p.add_argument("--splits", type=int, default=argparse.SUPPRESS,
                   help=f"candidates to split, strongest first {recipe('splits')}")
    p.add_argument("--weakest", type=int, default=argparse.SUPPRESS,
                   help="also split this many of the weakest candidates (the highest cosine, other channels), to "
                        f"show where the split does not separate {recipe('weakest')}")
    p.add_argument("--batch_size", type=int, default=128, help="--batch_size of the stage scripts (default 128)")
    p.add_argument("--num_workers", type=int, default=1, help="--num_workers of the stage scripts (default 1)")
    p.add_argument("--proportion_attribution_required", type=float, default=0.05,
                   help="stage 2 tau (default 0.05, the stage's own default)")
    p.add_argument("--p", type=float, default=0.75, help="stage 2 p (default 0.75)")
    p.add_argument("--quantitative_tau", type=float, default=0.03, help="stage 4 tau (default 0.03)")
    p.add_argument("--top_n", type=int, default=100, help="stage 2 --label_free --top_n (default 100)")
    p.add_argument("--fv_size", type=int, default=56, help="stage 4 --fv_size (default 56)")
    p.add_argument("--fv_steps", type=int, default=argparse.SUPPRESS, help=f"stage 4 --fv_steps {recipe('fv_steps')}")
    p.add_argument("--fv_crops", type=int, default=4, help="stage 4 --fv_crops (default 4)")
    p.add_argument("--fv_spectrum_images", type=int, default=argparse.SUPPRESS,
                   help=f"stage 4 --fv_spectrum_images {recipe('fv_spectrum_images')}")
    p.add_argument("--sae_steps", type=int, default=argparse.SUPPRESS, help=f"stage 4 --sae_steps {recipe('sae_steps')}")
    p.add_argument("--sae_train_images", type=int, default=argparse.SUPPRESS,
                   help=f"stage 4 --sae_train_images {recipe('sae_train_images')}; 0: all training images")
    p.add_argument("--no_feature_vis", action="store_true", help="skip the feature visualizations")
    p.add_argument("--no_sae_view", action="store_true", help="skip the SAE view")
    a = p.parse_args(argv)
    given = set(vars(a))
    for key, value in RECIPES["full" if a.full else "quick"].items():
        if key not in given:
            setattr(a, key, value)
    if "store_per_class" not in given and "train_per_class" in given:
        a.store_per_class = a.train_per_class  # the images it trained on, as before the recipes
    a.recipe = "full" if a.full else "quick"
    if a.splits < 1 or a.epochs < 1 or a.weakest < 0:
        p.error("--splits and --epochs must be at least 1, --weakest at least 0")
    return a


def train_or_reuse(args, weights, log):
    """Train the net into ``weights`` unless its ``_training.json`` records these settings; the summary."""
    record = file_names.training_record(weights)
    want = {"arch": args.arch, "epochs": args.epochs, "seed": args.seed, "threads": args.train_threads}
    if os.path.isfile(weights) and os.path.isfile(record):
        summary = atomic.read_json(record)
        n = summary.get("train_images")
        if {k: summary.get(k) for k in want} == want and n == (60000 if args.train_per_class is None
                                                                 else 10 * args.train_per_class):
            log(f"  reusing {weights} (trained with the same settings; test accuracy {summary['test_accuracy']:.4f})")
            return dict(summary, reused=True)
    return dict(fashion_model.train(weights, args.arch, args.epochs, args.seed, train_per_class=args.train_per_class,
                                    source=args.source, threads=args.train_threads, log=lambda s: log("  " + s)),
                reused=False)


def store_fits(store_dir, data_dir, names, model_reused):
    """Whether the stage-1 store(s) in ``store_dir`` may be kept: the model was not retrained and every store
    was made from ``data_dir`` with its current images per class (stage 1 then resumes or reuses it)."""
    if not model_reused:
        return False
    counts = [len(os.listdir(os.path.join(data_dir, "train", name))) for name in names]
    manifests = glob.glob(file_names.manifest(os.path.join(store_dir, "*")))
    return all(atomic.read_json(m).get("data_dir") == data_dir and
               atomic.read_json(m).get("images_per_class") == counts for m in manifests)


def candidate_counts(cands, thresholds=THRESHOLDS):
    """Candidate pairs and distinct channels with cosine below each threshold: {"0.5": {"pairs", "channels"}}."""
    return {str(t): {"pairs": sum(d["cosine_similarity"] < t for d in cands),
                     "channels": len({d["channel"] for d in cands if d["cosine_similarity"] < t})} for t in thresholds}


def strongest(cands, n):
    """The lowest-cosine pair of each channel, for the n channels whose lowest cosine is lowest (ties: channel,
    then classes)."""
    best = {}
    for d in strongest_first(cands):
        best.setdefault(d["channel"], d)
    return list(best.values())[:n]


def weakest(cands, n, exclude=()):
    """The highest-cosine pair of each channel not in ``exclude``, for the n channels whose highest cosine is
    highest (ties: channel, then classes)."""
    worst = {}
    for d in sorted(cands, key=lambda d: (-d["cosine_similarity"], d["channel"], d["class1"], d["class2"])):
        if d["channel"] not in exclude:
            worst.setdefault(d["channel"], d)
    return list(worst.values())[:n]


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    clean(out, MADE_HERE)  # each run starts clean (the data, the model and its store are reused when they match)
    store_per_class = args.store_per_class
    sizes = "_".join("all" if n is None else str(n) for n in (store_per_class, args.val_per_class))
    data_dir = os.path.abspath(args.data_dir or os.path.join(out, f"data_{sizes}"))
    store_dir, weights = os.path.join(out, "store"), os.path.join(out, "model.pth")
    seconds = {}

    print(f"[1/7] Fashion-MNIST into {data_dir}", flush=True)
    t = time.time()
    names = fashion_mnist.write_image_folder(data_dir, store_per_class, args.val_per_class, args.source,
                                             log=lambda s: print("  " + s, flush=True))
    seconds["conversion"] = round(time.time() - t, 1)

    n_train = "all 60,000" if args.train_per_class is None else f"{10 * args.train_per_class:,}"
    print(f"[2/7] training {args.arch} ({args.epochs} epochs of {n_train} images, seed {args.seed}, "
          f"{args.train_threads} thread{'s' if args.train_threads != 1 else ''}; recipe {args.recipe})", flush=True)
    t = time.time()
    training = train_or_reuse(args, weights, lambda s: print(s, flush=True))
    seconds["training"] = round(time.time() - t, 1)
    if os.path.isdir(store_dir) and not store_fits(store_dir, data_dir, names, training["reused"]):
        shutil.rmtree(store_dir)  # a store of other weights or images: stage 1 would refuse it

    r = Runner(out)
    model = fashion_spec(args.arch)
    common = (["--data_dir", data_dir, "--model", model, "--weights", weights, "--batch_size", args.batch_size,
               "--num_workers", args.num_workers] + transform_flags())
    stages = Stages(r, common, store_dir, out, model)
    print("[3/7] stage 1: attributions and patch sums of every training image", flush=True)
    print(short(stages.stage1(), 2))

    tau, pp = float(args.proportion_attribution_required), float(args.p)
    print("[4/7] stage 2: gamma-polysemantic candidates (every pair, cosine in [0, 1))", flush=True)
    print(short(stages.stage2(tau, pp, 0.0, 1.0), 2))
    cand_path = stages.candidates(tau, pp, 0.0, 1.0)
    cands = atomic.read_json(cand_path)["candidates"]
    counts = candidate_counts(cands)
    print("  " + ", ".join(f"{v['pairs']} pairs on {v['channels']} channels below cosine {k}"
                           for k, v in counts.items()))
    if not cands:
        raise SystemExit(f"stage 2 found no channel used by two classes (tau={tau}, p={pp})")
    chosen = strongest(cands, args.splits)
    chosen += weakest(cands, args.weakest, {d["channel"] for d in chosen})

    splits = []
    for n, best in enumerate(chosen):
        c, y1, y2 = best["channel"], best["class1"], best["class2"]
        print(f"[5/7] stage 3 and 4, candidate {n + 1}/{len(chosen)}: channel {c}, {names[y1]} vs {names[y2]}, "
              f"cosine {best['cosine_similarity']:.4f}", flush=True)
        print(short(stages.stage3(f"stage3_channel{c}", c, y1, y2), 3))
        extra = []
        if n == 0 and not args.no_feature_vis:
            extra += ["--get_feature_vis", "--fv_size", args.fv_size, "--fv_steps", args.fv_steps,
                      "--fv_crops", args.fv_crops, "--fv_spectrum_images", args.fv_spectrum_images]
        if n == 0 and not args.no_sae_view:
            extra += ["--get_sae_view", "--sae_steps", args.sae_steps, "--sae_train_images", args.sae_train_images]
        print(short(stages.stage4(f"stage4_channel{c}", c, y1, y2, 8, args.quantitative_tau, extra), 4))
        files = stages.split_files(c, y1, y2)
        summary = atomic.read_json(files.summary)
        info_path = files.info
        info = atomic.read_json(info_path)
        entry = {"role": "strongest" if n < args.splits else "weakest", "channel": c, "class1": names[y1],
                 "class2": names[y2], "class1_index": y1, "class2_index": y2,
                 "cosine_similarity": best["cosine_similarity"], "best_rho": info["best_rho"],
                 "train_images_concept1": info["train_images_concept1"],
                 "train_images_concept2": info["train_images_concept2"],
                 "sep_concept1": summary["sep_concept1"], "sep_concept2": summary["sep_concept2"],
                 "mean_pos_concept1": summary["mean_pos_concept1"], "mean_pos_concept2": summary["mean_pos_concept2"],
                 "quantitative_concept1": summary.get("quantitative_concept1"),
                 "quantitative_concept2": summary.get("quantitative_concept2"),
                 "val_images_concept1": summary["val_images_concept1"],
                 "val_images_concept2": summary["val_images_concept2"],
                 "max_logit_diff": info["max_logit_diff"], "max_abs_logit": info["max_abs_logit"],
                 "logit_check_images": info["logit_check_images"], "logits_unchanged": info["exact"],
                 "checkpoint": os.path.join(file_names.checkpoints_dir(store_dir), info["best_checkpoint"]),
                 "info_json": info_path, "top_images": summary.get("top_images"),
                 "plots": files.own_plots}
        if "feature_vis" in summary:
            fv = atomic.read_json(files.feature_vis)
            entry["feature_vis"] = {"figure": fv["figure"], "activation": fv.get("activation"),
                                    "val_max": fv.get("val_max"), "targets": fv.get("targets")}
        if "sae_view" in summary:
            sv = atomic.read_json(files.sae_view)
            entry["sae_view"] = {k: sv.get(k) for k in ("figure", "fvu", "dead_features", "dictionary",
                                                        "constant_term_share", "features", "sae")}
        splits.append(entry)
        print(f"  separation {names[y1]} {entry['sep_concept1']:.3g}, {names[y2]} {entry['sep_concept2']:.3g}; "
              f"logits: max difference {entry['max_logit_diff']:.2e} (largest |logit| {entry['max_abs_logit']:.3g})",
              flush=True)

    channels = [s["channel"] for s in splits]
    print(f"[6/7] label-free concepts of channels {channels} (stage 2 --label_free)", flush=True)
    print(short(stages.label_free(",".join(map(str, channels)), args.top_n), 4))
    concepts_path = stages.concepts(args.top_n)
    concepts = atomic.read_json(concepts_path)["channels"]
    label_free = {str(c): {"k": concepts[str(c)]["k"], "silhouette": concepts[str(c)]["silhouette"],
                           "purity": concepts[str(c)]["purity"], "sign": concepts[str(c)]["sign"],
                           "clusters": [{"size": cl["size"], "classes": cl["classes"], "purity": cl["purity"]}
                                        for cl in concepts[str(c)]["clusters"]]} for c in channels}
    seconds.update(r.seconds)
    seconds["total"] = round(time.time() - start, 1)
    report = {"recipe": args.recipe, "data": {"data_dir": data_dir, "classes": names, "train_per_class": args.train_per_class,
                       "store_per_class": store_per_class,
                       "val_per_class": args.val_per_class, "transform": transform_flags()},
              "model": model, "weights": weights, "layer": fashion_model.LAYER,
              "training": training, "test_accuracy": training["test_accuracy"],
              "stage2": {"proportion_attribution_required": tau, "p": pp, "candidates_json": cand_path,
                         "pairs": len(cands),
                         "channels_used_by_two_or_more_classes": len({d["channel"] for d in cands}),
                         "below": counts,
                         "lowest": [dict(d, class1_name=names[d["class1"]], class2_name=names[d["class2"]])
                                    for d in sorted(cands, key=lambda d: d["cosine_similarity"])[:10]]},
              "splits": splits, "label_free": label_free, "concepts_json": concepts_path,
              "commands": r.commands, "seconds": seconds, "threads_training": training["threads"],
              "cpu_count": os.cpu_count()}
    atomic.write_json(os.path.join(out, "report.json"), report)
    print(f"[7/7] wrote {os.path.join(out, 'report.json')} ({seconds['total']} s)")
    return report


if __name__ == "__main__":
    cli.run(main)  # a bad input: one line and exit status 2
