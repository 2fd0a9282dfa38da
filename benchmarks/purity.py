"""Which way of splitting a polysemantic channel gives purer units? Scored on the demo, where every image's
true concepts are known (its class is a colour x texture pair).

For each seed (data, training and SAE): the demo's data, model and stages 1-4 (demo/run_demo.py; reused
when OUT/seed{s}/report.json exists), then for every channel that stage 2 lists as polysemantic:
  original   the channel itself;
  paper      D1 and D2 of stage 3 (disentangle_channel.py, run through its command line) for the channel's
             lowest-cosine class pair;
  k classes  D_1..D_k of stage 3 with one concept per class that stage 2 lists for the channel;
  SAE top-N  the N features with the largest mean pos(contribution to the channel) on its 32 top val images
             (utils/method/sae.py; the SAE of get_results.py --get_sae_view with the same settings, trained once per
             seed and kept in the store), each unit being the feature's contribution map conv(f_j, K_j);
  k-way      D_1..D_k of the split by label-free concepts (get_cosine_similarities.py --label_free,
             disentangle_channel.py --concepts_file: issue 11);
  PURE       virtual neurons: the channel's map on the val images whose ARV is nearest to cluster j's
             centroid (utils.method.clustering.nearest_centroid), zero elsewhere.
Every unit is scored on all val images by benchmarks/purity_scores.py: activation-weighted purity over classes,
colours and textures, top-N purity (N = val images per class) and its share of the channel's positive mass.
Unit kinds whose code is not there yet print "not available".

--data fashion_mnist: the same on real images (demo/run_fashion.py per seed: Fashion-MNIST, the small ResNet
trained with that seed, stages 1-4 at 28 x 28), for the channels that run split (its --splits strongest
candidates) rather than every channel stage 2 lists; the test labels are the ground truth, and the groups
are the coarse garment groups of demo.fashion_mnist.GROUPS (upper body, trouser, footwear, bag) instead
of colour and texture. A k-way split by stage 2's classes needs k <= 6: a channel used by more classes
has no such units.

  python -m benchmarks.purity [--out bench_out/purity] [--seeds 0 1 2] [--json FILE]
  python -m benchmarks.purity --data fashion_mnist [--out fmnist_out/purity] [--epochs 10] [--train_threads 2]
  python -m benchmarks.purity --from_json seed0.json seed1.json seed2.json [--json all.json]   (seeds run apart)
"""
import argparse
import glob
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from utils.model import tap
from utils.method import attribution
from utils.run import context
from utils.data import folders
from utils.files import atomic
from benchmarks import purity_scores as purity
from utils.method import sae as S
from utils.stages import sae_view
from utils.run import cli
from utils.files.names import class_checkpoint
from utils.method.evaluation import top_k
from utils.method.clustering import nearest_centroid
from utils.method.split import filter_maps, positive_mass
from utils.stages.stage4 import checkpoint_filters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = "demo.model:shapes_cnn"
METRICS = ("purity", "purity_colour", "purity_texture", "top_n_purity", "share")
FASHION_METRICS = ("purity", "purity_group", "top_n_purity", "share")
MAX_K = 6  # disentangle_channel.py splits into at most 6 concepts


def script(name, args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, name)] + [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def fashion_run(args, folder, seed):
    """demo/run_fashion.py into ``folder`` with ``seed`` (reused when its report.json exists). Returns its report."""
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        from demo import run_fashion
        argv = ["--out", folder, "--full", "--seed", str(seed), "--epochs", str(args.epochs), "--train_threads",
                str(args.train_threads), "--splits", str(args.splits), "--weakest", "0", "--no_feature_vis",
                "--no_sae_view", "--data_dir", os.path.join(args.out, "data")]
        for flag in ("train_per_class", "store_per_class", "val_per_class"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        run_fashion.main(argv)
    return atomic.read_json(path)


def demo_run(folder, seed):
    """The demo's data, model and stages (trained by demo/run_demo.py if absent). Returns its report."""
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        from demo import run_demo
        run_demo.main(["--out", folder, "--seed", str(seed), "--no_feature_vis"])
    return atomic.read_json(path)


def val_inputs(ctx, batch_size):
    """The layer's input on every val image: x (N, C_in, H, W), labels (N,)."""
    ds = ctx.dataset
    xs, ys = [], []
    loader = folders.make_loader(ds, folders.batches_of(list(range(len(ds))), batch_size), 0, ctx.device)
    for images, labels in loader:
        xs.append(tap.layer_input(ctx.model, ctx.conv, images.to(ctx.device)).float())
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys).numpy()


# ----------------------------------------------------------------------------- unit kinds
def concept_maps_pos(env, path):
    """pos(D_1) .. pos(D_k) on every val image of the checkpoint ``path`` (the residue R left out): (N, k)."""
    filters, bias = checkpoint_filters(torch.load(path, map_location="cpu", weights_only=True))
    return positive_mass(filter_maps(env.x, env.ctx.conv, filters[:-1], None if bias is None else bias[:-1])).numpy()


def original_units(env, c):
    return {"channel": env.pos_channel[c]}


def paper_units(env, c):
    """D1, D2 of stage 3 for the channel's lowest-cosine class pair (run if its checkpoint is missing)."""
    pair = min((d for d in env.candidates if d["channel"] == c), key=lambda d: d["cosine_similarity"])
    y1, y2 = pair["class1"], pair["class2"]
    path = os.path.join(env.store, "models_disentangled", class_checkpoint(env.tag, c, [[y1], [y2]], "best"))
    if not os.path.isfile(path):
        script("disentangle_channel.py", env.common + ["--store_dir", env.store, "--channel_disentangle", c,
                                                       "--classes_for_concept1", y1, "--classes_for_concept2", y2])
    pos = concept_maps_pos(env, path)
    names = env.names
    return {f"D1 ({names[y1]})": pos[:, 0], f"D2 ({names[y2]})": pos[:, 1]}


def kway_classes_units(env, c):
    """D_1..D_k of stage 3 with one concept per class that stage 2 lists for the channel (k = 2..4 here;
    disentangle_channel.py --classes_for_concept3.. of main's k-way stage 3)."""
    classes = sorted({y for d in env.candidates if d["channel"] == c for y in (d["class1"], d["class2"])})
    if len(classes) > MAX_K:
        return {}
    concepts = [[y] for y in classes]
    path = os.path.join(env.store, "models_disentangled", class_checkpoint(env.tag, c, concepts, "best"))
    if not os.path.isfile(path):
        flags = [a for j, y in enumerate(classes, start=1) for a in (f"--classes_for_concept{j}", y)]
        script("disentangle_channel.py", env.common + ["--store_dir", env.store, "--channel_disentangle", c] + flags)
    pos = concept_maps_pos(env, path)
    return {f"D{j + 1} ({env.names[y]})": pos[:, j] for j, y in enumerate(classes)}


def sae_units(env, c, n_features):
    """The n features with the largest mean pos(contribution) on the channel's top val images."""
    conv = env.ctx.conv
    with torch.no_grad():
        pos = positive_mass(S.channel_contributions(env.f, conv, conv.weight[c].detach(), env.sae.W_dec)).numpy()
    top = top_k(env.pos_channel[c], sae_view.TOP_OF_CHANNEL)
    mean = pos[top].mean(axis=0)
    return {f"f{j}": pos[:, j] for j in top_k(mean, n_features) if mean[j] > 0}


def concepts_file(env, c):
    """The label-free concepts of channel c (get_cosine_similarities.py --label_free)."""
    path = os.path.join(env.store, "results_get_cosine_similarities", f"{env.tag}_concepts_top100.json")
    concepts = atomic.read_json(path) if os.path.isfile(path) else {"channels": {}}
    if str(c) not in concepts["channels"]:
        script("get_cosine_similarities.py", env.common + ["--store_dir", env.store, "--label_free", "--channels", c,
                                                          "--top_n", 100])
        concepts = atomic.read_json(path)
    return path, concepts["channels"][str(c)]


def kway_units(env, c):
    """D_1..D_k of disentangle_channel.py --concepts_file for channel c."""
    path, _ = concepts_file(env, c)
    # utils.files.names.cluster_checkpoint: {tag}_channel{c}_top{N}_clusters0-1-2_f_best_unnormalized.pth
    found = lambda: sorted(glob.glob(os.path.join(env.store, "models_disentangled",
                                                  f"{env.tag}_channel{c}_top*_clusters*_f_best_unnormalized.pth")))
    if not found():
        script("disentangle_channel.py", env.common + ["--store_dir", env.store, "--channel_disentangle", c,
                                                       "--concepts_file", path])
    if not found():
        raise SystemExit(f"no k-way checkpoint of channel {c} found after disentangle_channel.py --concepts_file")
    pos = concept_maps_pos(env, found()[0])
    return {f"D{j + 1}": pos[:, j] for j in range(pos.shape[1])}


def pure_units(env, c):
    """Virtual neurons: pos(a[c]) on the val images whose ARV is nearest to cluster j's centroid, else 0."""
    from utils.method.similarities import arv
    _, ch = concepts_file(env, c)
    conv = env.ctx.conv
    r = arv(conv.weight[c].detach(), env.patch_sums)
    centroids = [cl["centroid"] for cl in ch["clusters"]]
    member = nearest_centroid(torch.as_tensor(r), torch.as_tensor(centroids)).numpy()
    pos = purity.virtual_neurons(env.pos_channel[c], member, len(centroids))
    return {f"cluster {j}": p for j, p in enumerate(pos)}


def unit_kinds(n_features):
    return [("original", original_units), ("paper split (D1, D2)", paper_units),
            ("k-way split by stage 2's classes", kway_classes_units),
            (f"SAE top-{n_features} features", lambda env, c: sae_units(env, c, n_features)),
            ("SAE top-8 features", lambda env, c: sae_units(env, c, 8)),
            ("k-way split (label-free concepts)", kway_units), ("PURE virtual neurons", pure_units)]


# ----------------------------------------------------------------------------- one seed
def run_seed(args, seed):
    start = time.time()
    folder = os.path.join(args.out, f"seed{seed}")
    store, weights = os.path.join(folder, "store"), os.path.join(folder, "model.pth")
    transform, extra = {}, []
    if args.data == "fashion_mnist":
        from demo import fashion_mnist, run_fashion
        report = fashion_run(args, folder, seed)
        model, data_dir = report["model"], report["data"]["data_dir"]
        candidates = atomic.read_json(report["stage2"]["candidates_json"])["candidates"]
        split_channels = [s["channel"] for s in report["splits"] if s.get("role") != "weakest"]
        transform = {"resize": run_fashion.SIZE, "crop": run_fashion.SIZE, "mean": [fashion_mnist.MEAN] * 3,
                     "std": [fashion_mnist.STD] * 3}
        extra = run_fashion.transform_flags()
    else:
        report = demo_run(folder, seed)
        model, data_dir = MODEL, os.path.join(folder, "data")
        candidates = atomic.read_json(report["candidates_json"])["candidates"]
        split_channels = None
    seconds_run = round(time.time() - start, 1)
    ns = SimpleNamespace(device=args.device, gpu=None, model=model, weights=weights, layer_of_interest="last_conv",
                         nr_channels_in_layer_of_interest=None, batch_size=64, data_dir=data_dir, model_dir=store,
                         num_workers=0, sae_seed=seed, **transform,
                         **{k: getattr(args, k) for k in sae_view.DEFAULTS if k != "sae_seed"})
    ctx = context.setup(ns, split="val")
    for p in ctx.model.parameters():
        p.requires_grad_(False)
    sae, info, sae_path, reused = sae_view.load_or_train(ctx, sae_view.Settings(
        **{k: getattr(ns, k) for k in sae_view.DEFAULTS}, batch_size=ns.batch_size, num_workers=ns.num_workers,
        data_dir=data_dir, store_dir=store), ctx.device)
    x, labels = val_inputs(ctx, 64)
    conv = ctx.conv
    with torch.no_grad():
        pos_channel = positive_mass(conv(x)).cpu().numpy().T  # (C_out, N)
        f = S.feature_maps(sae, x)
        fvu = S.fraction_of_variance_unexplained(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),
                                                 S.reconstruction(sae, f).permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        patch_sums = attribution.conv_patch_sums(x, conv).cpu()
    names = ctx.dataset.classes
    n = int(np.bincount(labels).max())
    env = SimpleNamespace(ctx=ctx, x=x.cpu(), labels=labels, names=names, pos_channel=pos_channel, sae=sae.cpu(),
                          f=f.cpu(), patch_sums=patch_sums, store=store, candidates=candidates, tag=ctx.tag,
                          common=["--data_dir", data_dir, "--model", model, "--weights", weights, "--num_workers", 0]
                          + extra)
    channels = sorted({d["channel"] for d in candidates}) if split_channels is None else sorted(split_channels)
    out = {"seed": seed, "channels": channels, "sae": sae_path, "sae_reused": reused, "sae_fvu_val": fvu,
           "sae_dead_train": info["dead_train"], "val_per_class": n, "kinds": {}}
    for kind, fn in unit_kinds(args.sae_features):
        rows = []
        for c in channels:
            for name, pos in fn(env, c).items():
                rows.append(dict(score(args, pos, labels, names, n, pos_channel[c]), channel=c, unit=name))
        out["kinds"][kind] = {"units": rows}
    out.update(seconds_run=seconds_run, seconds=round(time.time() - start, 1))
    return out


def score(args, pos, labels, names, n, pos_channel):
    """purity_scores.score_unit; for Fashion-MNIST the coarse garment groups instead of colour and texture."""
    if args.data != "fashion_mnist":
        return purity.score_unit(pos, labels, names, n, pos_channel)
    from demo import fashion_mnist
    labels = np.asarray(labels)
    p, heaviest = purity.activation_purity(pos, labels)
    return {"purity": p, "class": names[heaviest] if heaviest >= 0 else None,
            "purity_group": purity.activation_purity(pos, fashion_mnist.class_groups()[labels])[0],
            "top_n_purity": purity.top_n_purity(pos, labels, n), "share": purity.share_of_channel(pos, pos_channel)}


def metrics_of(per_seed):
    return FASHION_METRICS if "purity_group" in next((u for s in per_seed for k in s["kinds"].values()
                                                      for u in k["units"]), {}) else METRICS


def summarize(per_seed):
    """Per unit kind: the mean of each metric over its units, per seed, then mean and sd over seeds."""
    table = {}
    metrics = metrics_of(per_seed)
    for kind in per_seed[0]["kinds"]:
        seeds = [s["kinds"][kind] for s in per_seed]
        row = {"count": [len(s["units"]) for s in seeds]}
        for m in metrics:
            vals = [float(np.nanmean([u[m] for u in s["units"]])) if s["units"] else float("nan") for s in seeds]
            row[m] = {"per_seed": vals, "mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
        table[kind] = row
    return table


def print_table(table, seeds):
    metrics = FASHION_METRICS if any("purity_group" in row for row in table.values()) else METRICS
    shown = {"purity_colour": "colour", "purity_texture": "texture", "purity_group": "group", "top_n_purity": "top-N"}
    head = f"{'unit kind':36} " + " ".join(f"{shown.get(m, m):>13}" for m in metrics) + "  units"
    print(f"\nmean over units, then mean ± sd over seeds {seeds}")
    print(head)
    print("-" * len(head))
    for kind, row in table.items():
        cells = " ".join(f"{row[m]['mean']:6.3f} ± {row[m]['sd']:.3f}" for m in metrics)
        print(f"{kind:36} {cells}  {'/'.join(map(str, row['count']))}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("shapes", "fashion_mnist"), default="shapes",
                   help="shapes (default: the demo) or fashion_mnist (real images, demo/run_fashion.py)")
    p.add_argument("--out", default=None, help="folder of the runs (default bench_out/purity, or fmnist_out/purity "
                                               "with --data fashion_mnist)")
    g = p.add_argument_group("--data fashion_mnist (passed to demo/run_fashion.py)")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--train_threads", type=int, default=2)
    g.add_argument("--splits", type=int, default=3, help="channels scored per seed: the strongest candidates")
    g.add_argument("--train_per_class", type=int, default=None)
    g.add_argument("--store_per_class", type=int, default=None)
    g.add_argument("--val_per_class", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sae_features", type=int, default=2, help="SAE features per channel scored as units (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the table and every unit's numbers here")
    for k, v in sae_view.DEFAULTS.items():
        if k != "sae_seed":
            p.add_argument("--" + k, type=type(v), default=v)
    p.add_argument("--from_json", nargs="+", default=None,
                   help="only combine the per-seed results of earlier --json files (one seed each, run apart) into "
                        "the table (and --json)")
    args = p.parse_args(argv)
    if args.from_json:
        per_seed = [s for path in args.from_json for s in atomic.read_json(path)["per_seed"]]
        table = summarize(per_seed)
        print_table(table, [s["seed"] for s in per_seed])
        if args.json:
            atomic.write_json(args.json, {"from": args.from_json, "seeds": [s["seed"] for s in per_seed],
                                          "table": table, "per_seed": per_seed})
        return table
    if args.out is None:
        args.out = os.path.join(ROOT, "fmnist_out" if args.data == "fashion_mnist" else "bench_out", "purity")
    start = time.time()
    per_seed = []
    for s in args.seeds:
        print(f"=== seed {s}", flush=True)
        per_seed.append(run_seed(args, s))
        r = per_seed[-1]
        print(f"channels {r['channels']}; SAE FVU on val {r['sae_fvu_val']:.3f}, dead {r['sae_dead_train']}"
              f"{' (reused)' if r['sae_reused'] else ''}")
        for kind, k in r["kinds"].items():
            for u in k["units"]:
                groups = (f"group {u['purity_group']:.3f}" if "purity_group" in u else
                          f"colour {u['purity_colour']:.3f} texture {u['purity_texture']:.3f}")
                print(f"  {kind:36} ch {u['channel']} {u['unit']:28} purity {u['purity']:.3f} ({u['class']}) "
                      f"{groups} top-N {u['top_n_purity']:.3f} share {u['share']:.3f}")
    table = summarize(per_seed)
    print_table(table, args.seeds)
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        settings = {k: getattr(args, k) for k in sae_view.DEFAULTS if k != "sae_seed"}
        atomic.write_json(args.json, {"data": args.data, "seeds": args.seeds,
                                      "sae_settings": dict(settings, sae_seed="= seed"),
                                      "sae_features": args.sae_features, "table": table, "per_seed": per_seed})
    return table


if __name__ == "__main__":
    cli.run(main)  # a bad input: one line and exit status 2
