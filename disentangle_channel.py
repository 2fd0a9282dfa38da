r"""Stage 3: split one channel into a channel per concept, for every rho, and pick the best rho.

Example (the paper's headline channel: digital clock vs. cauliflower):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --channel_disentangle 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938

All the paper's triples in one process (one model load, one pass over the union of their images;
the files are byte-identical to one run per triple):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --triples paper_triples.txt
"""
import argparse
import os

import numpy as np
from tqdm import tqdm

from utils import cli, context, data, disentangle, fileio, similarities, store
from utils.disentangle import RHOS, checkpoint_name
from utils.triples import check_triples, class_batches, triples_from_args, union_classes

HINT = (": the store read it, so the file changed since stage 1; restore it, or rerun stage 1 with "
        "--skip_unreadable into a new --store_dir")
TOL = f"{disentangle.TOLERANCE:.0e}".replace("e-0", "e-")  # 1e-4


def concept_rows(targets, t):
    """Store rows (= ImageFolder indices) of the readable training images of each concept of triple ``t``."""
    rows = [np.flatnonzero(np.isin(targets, s)) for s in (t.classes1, t.classes2)]
    for k, r in enumerate(rows, start=1):
        if not len(r):
            where = f"{t.where}: " if t.where else ""
            flag = f"concept {k}" if t.where else f"--classes_for_concept{k}"
            raise cli.UserError(f"{where}{flag} {getattr(t, f'classes{k}')}: no readable training image of "
                                f"these classes in the store")
    return rows


def split_every_triple(ctx, patch_sums, triples, rows):
    """The concepts' ARVs v1, v2 (closed form from the store's patch sums, one read per distinct concept) and
    the split filters of every rho, per triple. Returns (list of disentangle.Split, list of [v1, v2])."""
    means, arvs, splits = {}, [], []
    for t, (r1, r2) in zip(triples, rows):
        w_c = ctx.conv.weight[t.channel].detach()
        v = []
        for classes, r in ((t.classes1, r1), (t.classes2, r2)):
            if frozenset(classes) not in means:
                means[frozenset(classes)] = similarities.rows_mean_patch_sums(patch_sums, r)
            v.append(similarities.arv(w_c, means[frozenset(classes)]).float())
        arvs.append(v)
        bias_c = None if ctx.conv.bias is None else ctx.conv.bias[t.channel].detach()
        splits.append(disentangle.Split(t.channel, disentangle.split_filters(w_c, v[0], v[1]), bias_c,
                                        t.classes1, t.classes2))
    return splits, arvs


def check_networks(ctx, model, targets, triples, splits, found, n_images):
    """Best rho of each triple, and the full original and disentangled networks' logits on the first
    ``n_images`` training images: the same images whatever the triples, so the original's logits are
    computed once and each triple's numbers equal those of a run of it alone. Returns one dict per triple."""
    check = np.flatnonzero(targets >= 0)[:n_images].tolist()
    images = next(iter(data.make_loader(ctx.dataset, [check], 0, ctx.device, hint=HINT)))[0].to(ctx.device)
    original = disentangle.logits(model, images)
    runs = []
    for t, split, res in zip(triples, splits, found):
        best = disentangle.best_rho_index(res.scores)
        best_sd = disentangle.checkpoint_state_dict(split.filters[best], split.bias_c)
        diff, zmax, _ = disentangle.network_check(model, ctx.layer_path, t.channel, best_sd, images, original)
        runs.append(dict(best=best, best_sd=best_sd, logit_diff=diff, logit_max=zmax, logit_images=len(check),
                         maps_ok=disentangle.within_tolerance(res.max_map_diff, res.max_abs_map),
                         logits_ok=disentangle.within_tolerance(diff, zmax)))
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p)
    p.add_argument("--channel_disentangle", type=int, default=None,
                   help="channel of the layer to split (required unless --triples)")
    p.add_argument("--classes_for_concept1", nargs="+", default=None,
                   help="class indices of concept 1 (required unless --triples)")
    p.add_argument("--classes_for_concept2", nargs="+", default=None,
                   help="class indices of concept 2 (required unless --triples)")
    p.add_argument("--triples", default=None,
                   help="file of 'channel classes1 classes2' lines (as paper_triples.txt; several classes as "
                        "1,2): split every triple in one process, instead of the three flags above")
    p.add_argument("--exactness_images", type=int, default=4,
                   help="the first N training images, on which the full original and disentangled networks' "
                        "logits are compared (default 4); the split maps are compared with the layer's output on "
                        "every image scored")
    p.add_argument("--export_model", action="store_true",
                   help="also write the whole disentangled network's state dict (…_f_best_model.pth) and how to "
                        "rebuild it (…_f_best_model.json); utils.disentangle.load_disentangled_model builds it")
    args = p.parse_args()
    triples = triples_from_args(args.triples, args.channel_disentangle, args.classes_for_concept1,
                                args.classes_for_concept2, "--channel_disentangle", cli.parse_classes)
    if args.exactness_images < 1:
        raise cli.UserError("--exactness_images must be at least 1")

    ctx = context.setup(args, split="train")
    check_triples(ctx, triples, "--channel_disentangle")
    st = store.Store.open(store.store_folder(args.store_dir, ctx.tag), ctx.fingerprint)
    targets = st.labels()  # -1 for the rows of unreadable images, which are left out of everything
    unreadable = st.unreadable_rows()
    rows = [concept_rows(targets, t) for t in triples]  # every triple checked before any work

    splits, arvs = split_every_triple(ctx, st.array("patch_sums"), triples, rows)

    # one pass over every concept image of every triple, each image once, in batches of one class
    indices = np.flatnonzero(np.isin(targets, union_classes(triples)))  # store rows are ImageFolder indices
    batches = class_batches(indices, targets[indices], args.batch_size)
    workers = cli.default_workers(args.num_workers)
    loader = data.make_loader(ctx.dataset, batches, workers, ctx.device, hint=HINT)
    model = ctx.model.to(ctx.device)
    desc = "scoring 20 rho" + (f" of {len(triples)} triples" if len(triples) > 1 else "")
    found = disentangle.score_splits(model, ctx.conv, splits, loader, ctx.device,
                                     progress=lambda it: tqdm(it, desc=desc, unit="batch"))

    runs = check_networks(ctx, model, targets, triples, splits, found, args.exactness_images)

    names = st.manifest["classes"]
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    failed = [t for t, run in zip(triples, runs) if not (run["maps_ok"] and run["logits_ok"])]
    folder = os.path.join(args.store_dir, "models_disentangled")
    for t, (r1, r2), split, res, run, v in zip(triples, rows, splits, found, runs, arvs):
        if not failed:
            write_triple(ctx, folder, t, (len(r1), len(r2)), split, res, run, v)
            if args.export_model:
                export(ctx, model, folder, t, run)
        report(ctx, names, t, (len(r1), len(r2)), res, run, v, header=args.triples is not None)
        if not failed:
            print(f"wrote 20 checkpoints and {checkpoint_name(ctx.tag, t.channel, t.classes1, t.classes2, 'best')} "
                  f"to {folder}")
    if failed:
        which = "; ".join(f"channel {t.channel} {t.classes1} vs {t.classes2}" for t in failed)
        raise cli.UserError(f"the split does not reproduce the original layer and logits ({which}); nothing written")


def write_triple(ctx, folder, t, counts, split, res, run, v):
    """The 20 checkpoints, the best one, ``…_info.json`` and ``…_scores.png`` of triple ``t``."""
    c, s1, s2, best = t.channel, t.classes1, t.classes2, run["best"]
    for r, rho in enumerate(RHOS):
        fileio.save_torch(os.path.join(folder, checkpoint_name(ctx.tag, c, s1, s2, rho)),
                          disentangle.checkpoint_state_dict(split.filters[r], split.bias_c))
    best_path = os.path.join(folder, checkpoint_name(ctx.tag, c, s1, s2, "best"))
    fileio.save_torch(best_path, run["best_sd"])
    base = best_path[:-len("_f_best_unnormalized.pth")]
    src1, src2 = disentangle.split_sources(v[0], v[1], RHOS[best])
    fileio.write_json(base + "_info.json", dict(
        ctx.fingerprint, channel=c, classes1=s1, classes2=s2, rhos=RHOS, scores=res.scores.tolist(),
        best_rho=RHOS[best], best_checkpoint=os.path.basename(best_path), max_logit_diff=run["logit_diff"],
        exact=run["maps_ok"] and run["logits_ok"], train_images_concept1=counts[0], train_images_concept2=counts[1],
        sources_concept1=int(src1.sum()), sources_concept2=int(src2.sum()), arv_concept1=v[0].tolist(),
        arv_concept2=v[1].tolist(), exactness_tolerance_relative=disentangle.TOLERANCE,
        max_abs_logit=run["logit_max"], logit_check_images=run["logit_images"],
        max_map_diff=res.max_map_diff, max_abs_map=res.max_abs_map,
        map_check_images=res.images1 + res.images2))
    from utils import plots  # matplotlib: not needed for --help or a failed check
    plots.rho_score_plot(base + "_scores.png", RHOS, res.scores.tolist(), RHOS[best],
                         f"{ctx.tag} channel {c}: {s1} vs {s2}")


def export(ctx, model, folder, t, run):
    """``--export_model``: the whole disentangled network of triple ``t``'s best split, as a state dict."""
    best_path = os.path.join(folder, checkpoint_name(ctx.tag, t.channel, t.classes1, t.classes2, "best"))
    dmodel = disentangle.disentangled_model(model, ctx.layer_path, t.channel, run["best_sd"])
    paths = disentangle.export_model(best_path[:-len("_f_best_unnormalized.pth")], dmodel, ctx.model_spec,
                                     ctx.weights_id, ctx.layer_path, ctx.conv, t.channel, best_path)
    print("exported the disentangled network: " + " and ".join(paths))


def report(ctx, names, t, counts, res, run, v, header=False):
    """Print triple ``t``'s scores, best rho and both exactness checks."""
    c, s1, s2, best = t.channel, t.classes1, t.classes2, run["best"]
    src1, src2 = disentangle.split_sources(v[0], v[1], RHOS[best])
    if header:
        print(f"=== {t.where}: channel {c}, classes {s1} vs {s2}")
    print(f"channel {c} of {ctx.layer_path}: concept 1 = {[names[y] for y in s1]} ({counts[0]} train images), "
          f"concept 2 = {[names[y] for y in s2]} ({counts[1]} train images)")
    print("rho    " + " ".join(f"{r:>5}" for r in RHOS))
    print("score  " + " ".join(f"{s:5.2f}" for s in res.scores.tolist()))
    print(f"best rho = {RHOS[best]} (score {res.scores[best]:.4f}); {int(src1.sum())} input channels go to "
          f"concept 1, {int(src2.sum())} to concept 2, {len(v[0]) - int(src1.sum() + src2.sum())} to both")
    print(f"exactness on the {res.images1 + res.images2} images scored: max |D1 + D2 - R - channel {c}'s map| "
          f"= {res.max_map_diff:.3g} over all 20 rho (max |map| {res.max_abs_map:.3g}, tolerance "
          f"{TOL} relative): {'OK' if run['maps_ok'] else 'FAILED'}")
    print(f"exactness check on the first {run['logit_images']} training images: max |logit difference| = {run['logit_diff']:.3g} "
          f"(max |logit| {run['logit_max']:.3g}, tolerance {TOL} relative): "
          f"{'OK, same function' if run['logits_ok'] else 'FAILED'}")


if __name__ == "__main__":
    cli.run(main)
