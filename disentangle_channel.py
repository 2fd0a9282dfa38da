r"""Stage 3: split one channel into a channel per concept, for every rho, and pick the best rho.

Example (the paper's headline channel: digital clock vs. cauliflower):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --channel_disentangle 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938

All the paper's triples in one process (one model load, one pass over the union of their images;
the files are byte-identical to one run per triple):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --triples paper_triples.txt

Three (up to six) concepts, or the clusters of a concepts file (get_cosine_similarities.py --label_free);
--rho_score robust picks the best rho by the bounded score (both choices are always printed):
  python disentangle_channel.py ... --channel_disentangle 1660 --classes_for_concept1 530 \
      --classes_for_concept2 938 --classes_for_concept3 409,892
  python disentangle_channel.py ... --channel_disentangle 1660 \
      --concepts_file /data/store/results_get_cosine_similarities/resnet50_concepts_top100.json --clusters 0 2
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from utils.run import cli
from utils.concepts import by_clusters
from utils.run import context
from utils.data import folders
from utils import disentangle
from utils.files import atomic
from utils.method import similarities
from utils.disentangle import RHOS
from utils.concepts.by_classes import MORE_CONCEPTS, check_no_classes_with_file, check_triples, class_jobs

HINT = (": the store read it, so the file changed since stage 1; restore it, or rerun stage 1 with "
        "--skip_unreadable into a new --store_dir")
TOL = f"{disentangle.TOLERANCE:.0e}".replace("e-0", "e-")  # 1e-4


def concept_rows(targets, t):
    """Store rows (= ImageFolder indices) of the readable training images of each concept of ``t`` (a Triple,
    or ClusterConcepts whose rows come from the concepts file)."""
    if isinstance(t, by_clusters.ClusterConcepts):
        for j, r in zip(t.clusters, t.rows):
            if (targets[r] < 0).any():
                raise cli.UserError(f"--concepts_file {t.path}: cluster {j} of channel {t.channel} holds rows of "
                                    f"images stage 1 could not read; rerun the discovery on this store")
        return list(t.rows)
    rows = [np.flatnonzero(np.isin(targets, s)) for s in t.concepts]
    for k, r in enumerate(rows, start=1):
        if not len(r):
            where = f"{t.where}: " if t.where else ""
            flag = f"concept {k}" if t.where else f"--classes_for_concept{k}"
            raise cli.UserError(f"{where}{flag} {t.concepts[k - 1]}: no readable training image of "
                                f"these classes in the store")
    return rows


def file_name(ctx, t, rho):
    """Checkpoint name of job ``t`` (published pattern; ``_classes3[...]`` ... for k > 2; clusters named)."""
    if isinstance(t, by_clusters.ClusterConcepts):
        return disentangle.cluster_checkpoint_name(ctx.name, t.channel, t.top_n, t.clusters, rho)
    return disentangle.checkpoint_name_k(ctx.name, t.channel, t.concepts, rho)


def split_every_triple(ctx, patch_sums, triples, rows):
    """The concepts' ARVs v_1 .. v_k (closed form from the store's patch sums, one read per distinct concept)
    and the split filters of every rho, per job. Returns (list of disentangle.Split, list of [v_1, ..., v_k])."""
    means, arvs, splits = {}, [], []
    for t, rs in zip(triples, rows):
        by_rows = isinstance(t, by_clusters.ClusterConcepts)
        members = [r.tolist() for r in rs] if by_rows else t.concepts
        w_c = ctx.conv.weight[t.channel].detach()
        v = []
        for m, r in zip(members, rs):
            key = ("rows" if by_rows else "classes", frozenset(m))
            if key not in means:
                means[key] = similarities.rows_mean_patch_sums(patch_sums, r)
            v.append(similarities.arv(w_c, means[key]).float())
        arvs.append(v)
        bias_c = None if ctx.conv.bias is None else ctx.conv.bias[t.channel].detach()
        splits.append(disentangle.Split(t.channel, disentangle.split_filters_k(w_c, torch.stack(v)), bias_c,
                                        *members, by_rows=by_rows))
    return splits, arvs


def choose(res, rho_score):
    """Both best-rho choices of one job and the one ``--rho_score`` keeps. Returns a dict."""
    robust = res.robust()
    dead = res.dead()
    pub, rob = disentangle.best_rho_index(res.scores), disentangle.best_rho_index(robust)
    return dict(robust=robust, dead=dead, published_best=pub, robust_best=rob,
                degenerate=bool(disentangle.degenerate(dead)[pub]), rho_score=rho_score,
                best=pub if rho_score == "published" else rob)


def check_networks(ctx, model, targets, triples, splits, found, choices, n_images):
    """The full original and disentangled networks' logits at each job's chosen rho on the first
    ``n_images`` training images: the same images whatever the jobs, so the original's logits are
    computed once and each job's numbers equal those of a run of it alone. Returns one dict per job."""
    check = np.flatnonzero(targets >= 0)[:n_images].tolist()
    images = next(iter(folders.make_loader(ctx.dataset, [check], 0, ctx.device, hint=HINT)))[0].to(ctx.device)
    original = disentangle.logits(model, images)
    runs = []
    for t, split, res, ch in zip(triples, splits, found, choices):
        best = ch["best"]
        best_sd = disentangle.checkpoint_state_dict(split.filters[best], split.bias_c)
        diff, zmax, _ = disentangle.network_check(model, ctx.layer_path, t.channel, best_sd, images, original)
        runs.append(dict(ch, best_sd=best_sd, logit_diff=diff, logit_max=zmax, logit_images=len(check),
                         maps_ok=disentangle.within_tolerance(res.max_map_diff, res.max_abs_map),
                         logits_ok=disentangle.within_tolerance(diff, zmax)))
    return runs


def concepts_from_args(args):
    """The jobs of the command line: Triples (classes; --triples or the per-triple flags plus
    --classes_for_concept3..6) or one ClusterConcepts (--concepts_file), checked later against the store."""
    if args.concepts_file is not None:
        check_no_classes_with_file(args)
        if args.channel_disentangle is None:
            raise cli.UserError("--concepts_file needs --channel_disentangle (the channel whose clusters to use)")
        return None
    if args.clusters is not None:
        raise cli.UserError("--clusters selects clusters of --concepts_file: give the file too")
    return class_jobs(args, args.channel_disentangle, "--channel_disentangle", "splits")


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store_aliases=("--model_dir",))
    p.add_argument("--channel_disentangle", "--channel_of_interest", dest="channel_disentangle", type=int, default=None,
                   help="channel of the layer to split (required unless --triples; also --channel_of_interest)")
    p.add_argument("--classes_for_concept1", nargs="+", default=None,
                   help="class indices of concept 1 (required unless --triples or --concepts_file)")
    p.add_argument("--classes_for_concept2", nargs="+", default=None,
                   help="class indices of concept 2 (required unless --triples or --concepts_file)")
    for j in MORE_CONCEPTS:
        p.add_argument(f"--classes_for_concept{j}", nargs="+", default=None,
                       help=(f"class indices of concept {j}: a split into k = 3 .. 6 concepts (give concepts 3, 4, ... "
                             f"in order, all disjoint); checkpoints are named ..._classes3[...]_f..." if j == 3
                             else f"class indices of concept {j} (see --classes_for_concept3)"))
    p.add_argument("--triples", default=None,
                   help="file of 'channel classes1 classes2' lines (as paper_triples.txt; several classes as "
                        "1,2): split every triple in one process, instead of the three flags above")
    p.add_argument("--concepts_file", default=None,
                   help="concepts found without labels (get_cosine_similarities.py --label_free writes "
                        "STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json): split "
                        "--channel_disentangle into its clusters (concept j = cluster j's training rows); "
                        "checkpoints are named ..._top{N}_clusters0-1-2_f...")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the cluster indices to use as concepts, in this order "
                        "(default: all the channel's clusters; at least two)")
    p.add_argument("--rho_score", choices=("published", "robust"), default="published",
                   help="which best-rho score picks the ..._f_best checkpoint: published (sum_j mean q_j, default) "
                        "or robust (bounded; never a rho where a concept's own map is dead on more than half of "
                        "its images, see docs/concepts.md). Both are always printed and recorded in ..._info.json")
    p.add_argument("--exactness_images", type=int, default=4,
                   help="the first N training images, on which the full original and disentangled networks' "
                        "logits are compared (default 4); the split maps are compared with the layer's output on "
                        "every image scored")
    p.add_argument("--no_channels_last", action="store_true",
                   help="score in the default (contiguous) memory layout instead of channels-last: the scores' "
                        "last digits as before channels-last became the default (it is about 1.7x faster on CPU)")
    p.add_argument("--export_model", action="store_true",
                   help="also write the whole disentangled network's state dict (…_f_best_model.pth) and how to "
                        "rebuild it (…_f_best_model.json); utils.disentangle.load_disentangled_model builds it")
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "store_dir")
    triples = concepts_from_args(args)
    if args.exactness_images < 1:
        raise cli.UserError("--exactness_images must be at least 1")

    ctx = context.setup(args, split="train", store_flag="store_dir")
    if triples is None:
        context.check_channel(ctx, args.channel_disentangle, "--channel_disentangle")
    else:
        check_triples(ctx, triples, "--channel_disentangle")
    st = context.open_store(args, ctx)
    targets = st.labels()  # -1 for the rows of unreadable images, which are left out of everything
    unreadable = st.unreadable_rows()
    if triples is None:
        triples = [by_clusters.read_concepts_file(args.concepts_file, ctx.fingerprint, args.channel_disentangle,
                                               args.clusters, num_rows=len(targets))]
    rows = [concept_rows(targets, t) for t in triples]  # every job checked before any work

    splits, arvs = split_every_triple(ctx, st.array("patch_sums"), triples, rows)

    # one pass over every concept image of every job, each image once, in batches of one class
    indices = np.unique(np.concatenate([r for rs in rows for r in rs]))  # store rows are ImageFolder indices
    model = ctx.model
    desc = "scoring 20 rho" + (f" of {len(triples)} triples" if len(triples) > 1 else "")
    # on the device and channels-last after the split filters are taken from the weights: they stay contiguous
    found = disentangle.score_images(model, ctx.conv, splits, ctx.dataset, indices, args.batch_size, ctx.device,
                                     cli.default_workers(args.num_workers), channels_last=not args.no_channels_last,
                                     progress=lambda it: tqdm(it, desc=desc, unit="batch"), hint=HINT)
    choices = [choose(res, args.rho_score) for res in found]

    runs = check_networks(ctx, model, targets, triples, splits, found, choices, args.exactness_images)

    names = st.manifest["classes"]
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    failed = [t for t, run in zip(triples, runs) if not (run["maps_ok"] and run["logits_ok"])]
    folder = os.path.join(args.store_dir, "models_disentangled")
    for t, rs, split, res, run, v in zip(triples, rows, splits, found, runs, arvs):
        counts = [len(r) for r in rs]
        if not failed:
            write_triple(ctx, folder, t, counts, split, res, run, v, args.rho_score)
            if args.export_model:
                export(ctx, model, folder, t, run)
        report(ctx, names, t, counts, res, run, v, header=args.triples is not None)
        if not failed:
            print(f"wrote 20 checkpoints and {file_name(ctx, t, 'best')} to {folder}")
    if failed:
        which = "; ".join(f"channel {t.channel} {describe(t)}" for t in failed)
        raise cli.UserError(f"the split does not reproduce the original layer and logits ({which}); nothing written")


def describe(t):
    """'[0] vs [1]' (classes) or 'clusters 0 vs 2' (a concepts file)."""
    if isinstance(t, by_clusters.ClusterConcepts):
        return "clusters " + " vs ".join(str(j) for j in t.clusters)
    return " vs ".join(str(s) for s in t.concepts)


def write_triple(ctx, folder, t, counts, split, res, run, v, rho_score="published"):
    """The 20 checkpoints, the best one, ``…_info.json`` and ``…_scores.png`` of job ``t``.

    For two concepts given as classes with the published score, the checkpoints, the plot and the published
    keys of the info file are what the published-format path has always written; the keys of the robust
    score and both choices come after them."""
    c, best, k = t.channel, run["best"], len(counts)
    for r, rho in enumerate(RHOS):
        atomic.save_torch(os.path.join(folder, file_name(ctx, t, rho)),
                          disentangle.checkpoint_state_dict(split.filters[r], split.bias_c))
    best_path = os.path.join(folder, file_name(ctx, t, "best"))
    atomic.save_torch(best_path, run["best_sd"])
    base = best_path[:-len("_f_best_unnormalized.pth")]
    src = disentangle.split_sources_k(torch.stack(v), RHOS[best])
    if isinstance(t, by_clusters.ClusterConcepts):
        what = dict(clusters=t.clusters, concepts_file=os.path.abspath(t.path), concepts_sha256=t.sha256,
                    top_n=t.top_n, sign=t.sign)
    else:
        what = {f"classes{j}": s for j, s in enumerate(t.concepts, start=1)}
    info = dict(ctx.fingerprint, channel=c, **what, rhos=RHOS, scores=res.scores.tolist(), best_rho=RHOS[best],
                best_checkpoint=os.path.basename(best_path), max_logit_diff=run["logit_diff"],
                exact=run["maps_ok"] and run["logits_ok"])
    info.update({f"train_images_concept{j}": n for j, n in enumerate(counts, start=1)})
    info.update({f"sources_concept{j}": int(src[j - 1].sum()) for j in range(1, k + 1)})
    info.update({f"arv_concept{j}": v[j - 1].tolist() for j in range(1, k + 1)})
    info.update(exactness_tolerance_relative=disentangle.TOLERANCE, max_abs_logit=run["logit_max"],
                logit_check_images=run["logit_images"], max_map_diff=res.max_map_diff, max_abs_map=res.max_abs_map,
                map_check_images=sum(res.images))
    pub, rob = run["published_best"], run["robust_best"]
    info.update(rho_score=rho_score, robust_scores=run["robust"].tolist(), best_rho_published=RHOS[pub],
                best_rho_robust=RHOS[rob], published_choice_degenerate=run["degenerate"],
                dead_share_published=run["dead"][pub].tolist(), dead_share_robust=run["dead"][rob].tolist())
    atomic.write_json(base + "_info.json", info)
    from utils.report import plots  # matplotlib: not needed for --help or a failed check
    title = f"{ctx.name} channel {c}: {describe(t)}"
    if rho_score == "robust":
        plots.rho_score_plot(base + "_scores.png", RHOS, run["robust"].tolist(), RHOS[best], title,
                             ylabel="robust score = G - [degenerate]")
    elif k == 2:
        plots.rho_score_plot(base + "_scores.png", RHOS, res.scores.tolist(), RHOS[best], title)
    else:
        plots.rho_score_plot(base + "_scores.png", RHOS, res.scores.tolist(), RHOS[best], title,
                             ylabel="score = sum_j mean q_j")


def export(ctx, model, folder, t, run):
    """``--export_model``: the whole disentangled network of job ``t``'s best split, as a state dict."""
    best_path = os.path.join(folder, file_name(ctx, t, "best"))
    dmodel = disentangle.disentangled_model(model, ctx.layer_path, t.channel, run["best_sd"])
    paths = disentangle.export_model(best_path[:-len("_f_best_unnormalized.pth")], dmodel, ctx.model_spec,
                                     ctx.weights_id, ctx.layer_path, ctx.conv, t.channel, best_path)
    print("exported the disentangled network: " + " and ".join(paths))


def concept_label(names, t, j):
    """How the report names concept j (1-based) of job ``t``."""
    if isinstance(t, by_clusters.ClusterConcepts):
        top = sorted(t.class_counts[j - 1], key=lambda yc: -yc[1])[:3]
        return f"cluster {t.clusters[j - 1]} (" + ", ".join(f"{names[y]} x{n}" for y, n in top) + ")"
    return str([names[y] for y in t.concepts[j - 1]])


def score_number(s):
    """A score in at most 8 characters whatever its size: 2 decimals up to 9999.99, else 3 significant digits."""
    return f"{s:.2f}" if abs(s) < 9999.995 else f"{s:.2e}"


def score_table(rhos, scores, robust):
    """Three aligned lines: rho, the published score and the robust score of each rho (columns as wide as the
    widest number, so that any score fits)."""
    cols = [[str(r), score_number(a), score_number(b)] for r, a, b in zip(rhos, scores, robust)]
    width = max(5, max(len(x) for col in cols for x in col))
    return [f"{head:<7}" + " ".join(f"{col[i]:>{width}}" for col in cols)
            for i, head in enumerate(("rho", "score", "robust"))]


def report(ctx, names, t, counts, res, run, v, header=False):
    """Print job ``t``'s scores, both best-rho choices, the degeneracy warning and both exactness checks."""
    c, best, k = t.channel, run["best"], len(counts)
    src = disentangle.split_sources_k(torch.stack(v), RHOS[best])
    if header:
        print(f"=== {t.where}: channel {c}, classes {describe(t)}")
    print(f"channel {c} of layer '{ctx.layer_path}': " + ", ".join(
        f"concept {j} = {concept_label(names, t, j)} ({counts[j - 1]} train images)" for j in range(1, k + 1)))
    print("\n".join(score_table(RHOS, res.scores.tolist(), run["robust"].tolist())))
    chosen = res.scores[best] if run["rho_score"] == "published" else run["robust"][best]
    goes = ", ".join(f"{int(src[j].sum())} to concept {j + 1}" for j in range(1, k))
    print(f"best rho = {RHOS[best]} (score {float(chosen):.4f}); {int(src[0].sum())} input channels go to "
          f"concept 1, {goes}, {len(v[0]) - int(src.sum())} to {'both' if k == 2 else 'all'}")
    pub, rob = run["published_best"], run["robust_best"]
    dead = run["dead"]

    def dead_text(r):
        return "/".join(f"{100 * float(d):.0f}%" for d in dead[r])
    print(f"rho choices: published rho = {RHOS[pub]} (score {float(res.scores[pub]):.4g}; own map dead on "
          f"{dead_text(pub)} of each concept's images), robust rho = {RHOS[rob]} (score "
          f"{float(run['robust'][rob]):.4f}; dead on {dead_text(rob)}); ..._f_best is the {run['rho_score']} choice")
    if run["degenerate"]:
        worst = int(torch.argmax(dead[pub]))
        print(f"warning: the published choice rho = {RHOS[pub]} is degenerate: concept {worst + 1}'s own map D{worst + 1} "
              f"has no positive activation on {100 * float(dead[pub, worst]):.0f}% of its "
              f"{res.images[worst]} images (robust choice: rho = {RHOS[rob]}, --rho_score robust)")
    merged = " + ".join(f"D{j}" for j in range(1, k + 1)) + (" - R" if k == 2 else f" - {k - 1} R")
    print(f"exactness on the {sum(res.images)} images scored: max |{merged} - channel {c}'s map| "
          f"= {res.max_map_diff:.3g} over all 20 rho (max |map| {res.max_abs_map:.3g}, tolerance "
          f"{TOL} relative): {'OK' if run['maps_ok'] else 'FAILED'}")
    print(f"exactness check on the first {run['logit_images']} training images: max |logit difference| = {run['logit_diff']:.3g} "
          f"(max |logit| {run['logit_max']:.3g}, tolerance {TOL} relative): "
          f"{'OK, same function' if run['logits_ok'] else 'FAILED'}")


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
