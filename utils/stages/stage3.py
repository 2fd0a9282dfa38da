"""Stage 3: split a channel into one channel per concept for every rho, pick the best rho, check, write.

One process splits any number of jobs (``--triples``) with one model load and one pass: the concepts' ARVs
v_1 .. v_k come in closed form from the store's patch sums (one read per distinct set of rows); the split
filters of every rho (``utils.method.split``) of every job are scored in one scan over the union of their
training images, in batches of one class each (``by_classes.class_batches``: each image is computed in the
same batch whatever else is scored, so a job's files are those of a run of it alone); the full original and
disentangled networks' logits are compared at each job's chosen rho; then, if every job is exact, each
job's 20 checkpoints, the best one, ``…_info.json`` and ``…_scores.png`` are written (``utils.files.names``).
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from utils import disentangle
from utils.concepts import by_clusters
from utils.concepts.by_classes import check_no_classes_with_file, check_triples, class_batches, class_jobs
from utils.data import folders, scan
from utils.files import atomic, names, store
from utils.method import rho_scores, similarities
from utils.method.split import (RHOS, TOLERANCE, checkpoint_state_dict, split_filters_k, split_sources_k,
                                within_tolerance)
from utils.report import stage3_text
from utils.run import cli, context

HINT = (": the store read it, so the file changed since stage 1; restore it, or rerun stage 1 with "
        "--skip_unreadable into a new --store_dir")


@dataclass(frozen=True)
class Settings:
    """What stage 3 was asked, from its flags. jobs: the Triples of the command line, or None where the
    concepts come from ``concepts_file`` (read once the store is open)."""
    store_dir: str
    channel: int
    jobs: tuple
    concepts_file: str
    clusters: tuple
    rho_score: str
    exactness_images: int
    channels_last: bool
    export_model: bool
    batch_size: int
    num_workers: int
    header: bool  # --triples: a header line per job

    @classmethod
    def from_args(cls, args):
        """The settings of the parsed flags; one-line errors for flags that do not fit together."""
        return cls(args.store_dir, args.channel_disentangle, _jobs_of_args(args), args.concepts_file,
                   None if args.clusters is None else tuple(args.clusters), args.rho_score,
                   _exactness_images(args.exactness_images), not args.no_channels_last, args.export_model,
                   args.batch_size, cli.default_workers(args.num_workers), args.triples is not None)


def _jobs_of_args(args):
    """Triples (--triples or the per-triple flags plus --classes_for_concept3..6), or None for --concepts_file."""
    if args.concepts_file is not None:
        check_no_classes_with_file(args)
        if args.channel_disentangle is None:
            raise cli.UserError("--concepts_file needs --channel_disentangle (the channel whose clusters to use)")
        return None
    if args.clusters is not None:
        raise cli.UserError("--clusters selects clusters of --concepts_file: give the file too")
    return tuple(class_jobs(args, args.channel_disentangle, "--channel_disentangle", "splits"))


def _exactness_images(n):
    if n < 1:
        raise cli.UserError("--exactness_images must be at least 1")
    return n


@dataclass
class Job:
    """One split: its concepts (a ``Concepts``), their training rows (k arrays), ARVs (k (C_in,) float32), the
    split filters of every rho, then the scores and the ``choose`` dict with the network check (``run``)."""
    concepts: object
    rows: list
    arvs: list
    split: rho_scores.Split
    res: rho_scores.SplitScores = None
    run: dict = None

    @property
    def counts(self):
        return [len(r) for r in self.rows]

    def checkpoint(self, ctx, folder, rho):
        return os.path.join(folder, self.concepts.checkpoint(ctx.name, rho))


def make_jobs(conv, patch_sums, concepts, rows):
    """The Job of each ``Concepts``: its ARVs v_1 .. v_k (closed form from the store's patch sums, one read per
    distinct set of rows) and the split filters of every rho."""
    means, jobs = {}, []
    for t, rs in zip(concepts, rows):
        w_c = conv.weight[t.channel].detach()
        v = []
        for r in rs:
            key = frozenset(r.tolist())  # the same rows give the same mean, whatever names the concept
            if key not in means:
                means[key] = similarities.rows_mean_patch_sums(patch_sums, r)
            v.append(similarities.arv(w_c, means[key]).float())
        bias_c = None if conv.bias is None else conv.bias[t.channel].detach()
        jobs.append(Job(t, rs, v, rho_scores.Split(t.channel, split_filters_k(w_c, torch.stack(v)), bias_c, rs)))
    return jobs


def score_images(ctx, splits, indices, s, desc=None):
    """``rho_scores.score_splits`` of ``splits`` over the training images ``indices``: stage 3's one scan.

    ctx: the model, layer (conv), dataset and device; s: batch_size, num_workers, channels_last. Batches hold
    one class each (``class_batches``), so an image's numbers do not depend on which other images are scored.
    With ``s.channels_last`` the model is converted in place (take the split filters from its weights before)
    and the images go in channels-last: the same numbers to float32 rounding, a faster forward on CPUs and
    recent GPUs (on a 2-core x86 CPU a ResNet-50 forward takes 0.069 s per image instead of 0.121 s).
    Returns one SplitScores per Split.
    """
    ds = ctx.dataset
    batches = class_batches(indices, [ds.targets[i] for i in indices], s.batch_size)
    model = ctx.model.to(ctx.device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = scan.scan(model, ctx.conv, ds, batches, ctx.device, s.num_workers, what=scan.INPUT_OUTPUT, hint=HINT,
                       channels_last=s.channels_last)
    return rho_scores.score_splits(ctx.conv, splits, tqdm(images, desc=desc, unit="batch", disable=desc is None),
                                   ctx.device)


def check_networks(ctx, targets, jobs, s):
    """The full original and disentangled networks' logits at each job's chosen rho on the first
    ``s.exactness_images`` readable training images: the same images whatever the jobs, so the original's
    logits are computed once and each job's numbers equal those of a run of it alone. Sets each job's ``run``."""
    check = np.flatnonzero(targets >= 0)[:s.exactness_images].tolist()
    images = next(iter(folders.make_loader(ctx.dataset, [check], 0, ctx.device, hint=HINT)))[0].to(ctx.device)
    original = disentangle.logits(ctx.model, images)
    for job in jobs:
        ch = rho_scores.choose(job.res, s.rho_score)
        best_sd = checkpoint_state_dict(job.split.filters[ch["best"]], job.split.bias_c)
        diff, zmax, _ = disentangle.network_check(ctx.model, ctx.layer_path, job.concepts.channel, best_sd, images,
                                                  original)
        job.run = dict(ch, best_sd=best_sd, logit_diff=diff, logit_max=zmax, logit_images=len(check),
                       maps_ok=within_tolerance(job.res.max_map_diff, job.res.max_abs_map),
                       logits_ok=within_tolerance(diff, zmax))


def info_record(ctx, job, best_path):
    """``…_info.json`` of a job: the published keys (fingerprint, concepts, scores, best rho, exactness), then
    the robust score and both choices."""
    t, res, run, v = job.concepts, job.res, job.run, job.arvs
    best, k = run["best"], t.k
    src = split_sources_k(torch.stack(v), RHOS[best])
    info = dict(ctx.fingerprint, channel=t.channel, **t.info_keys(), rhos=RHOS, scores=res.scores.tolist(),
                best_rho=RHOS[best], best_checkpoint=os.path.basename(best_path), max_logit_diff=run["logit_diff"],
                exact=run["maps_ok"] and run["logits_ok"])
    info.update({f"train_images_concept{j}": n for j, n in enumerate(job.counts, start=1)})
    info.update({f"sources_concept{j}": int(src[j - 1].sum()) for j in range(1, k + 1)})
    info.update({f"arv_concept{j}": v[j - 1].tolist() for j in range(1, k + 1)})
    info.update(exactness_tolerance_relative=TOLERANCE, max_abs_logit=run["logit_max"],
                logit_check_images=run["logit_images"], max_map_diff=res.max_map_diff, max_abs_map=res.max_abs_map,
                map_check_images=sum(res.images))
    pub, rob = run["published_best"], run["robust_best"]
    info.update(rho_score=run["rho_score"], robust_scores=run["robust"].tolist(), best_rho_published=RHOS[pub],
                best_rho_robust=RHOS[rob], published_choice_degenerate=run["degenerate"],
                dead_share_published=run["dead"][pub].tolist(), dead_share_robust=run["dead"][rob].tolist())
    return info


def write_job(ctx, folder, job):
    """The 20 checkpoints, the best one, ``…_info.json`` and ``…_scores.png`` of a job.

    For two concepts given as classes with the published score, the checkpoints, the plot and the published
    keys of the info file are what the published-format path has always written."""
    t, run = job.concepts, job.run
    for r, rho in enumerate(RHOS):
        atomic.save_torch(job.checkpoint(ctx, folder, rho), checkpoint_state_dict(job.split.filters[r],
                                                                                  job.split.bias_c))
    best_path = job.checkpoint(ctx, folder, "best")
    atomic.save_torch(best_path, run["best_sd"])
    atomic.write_json(names.info_file(best_path), info_record(ctx, job, best_path))
    from utils.report import plots  # matplotlib: not needed for --help or a failed check
    title, best = f"{ctx.name} channel {t.channel}: {t.describe()}", RHOS[run["best"]]
    if run["rho_score"] == "robust":
        plots.rho_score_plot(names.scores_plot(best_path), RHOS, run["robust"].tolist(), best, title,
                             ylabel="robust score = G - [degenerate]")
    elif t.k == 2:
        plots.rho_score_plot(names.scores_plot(best_path), RHOS, job.res.scores.tolist(), best, title)
    else:
        plots.rho_score_plot(names.scores_plot(best_path), RHOS, job.res.scores.tolist(), best, title,
                             ylabel="score = sum_j mean q_j")


def export(ctx, folder, job):
    """``--export_model``: the whole disentangled network of the job's best split, as a state dict."""
    best_path = job.checkpoint(ctx, folder, "best")
    dmodel = disentangle.disentangled_model(ctx.model, ctx.layer_path, job.concepts.channel, job.run["best_sd"])
    paths = disentangle.export_model(dmodel, ctx.model_spec, ctx.weights_id, ctx.layer_path, job.concepts.channel,
                                     best_path)
    print("exported the disentangled network: " + " and ".join(paths))


def read_concepts(ctx, s):
    """The store, its training labels (-1 for unreadable images) and the jobs' concepts, every one checked
    against the layer and the data before any work."""
    if s.jobs is None:
        context.check_channel(ctx, s.channel, "--channel_disentangle")
    else:
        check_triples(ctx, s.jobs, "--channel_disentangle")
    st = store.Store.open(store.find_folder(s.store_dir, ctx.tag, ctx.name, ctx.layer_path), ctx.fingerprint)
    targets = st.labels()
    concepts = list(s.jobs) if s.jobs is not None else [
        by_clusters.read_concepts_file(s.concepts_file, ctx.fingerprint, s.channel, s.clusters, num_rows=len(targets))]
    return st, targets, concepts


def run(ctx, s):
    """Stage 3 for the settings ``s`` in the context ``ctx`` (model, layer, training data)."""
    st, targets, concepts = read_concepts(ctx, s)
    rows = [t.training_rows(targets) for t in concepts]  # every job checked before any work
    jobs = make_jobs(ctx.conv, st.array("patch_sums"), concepts, rows)
    # one pass over every concept image of every job, each image once, in batches of one class
    indices = np.unique(np.concatenate([r for rs in rows for r in rs]))  # store rows are ImageFolder indices
    found = score_images(ctx, [job.split for job in jobs], indices, s,
                         "scoring 20 rho" + (f" of {len(jobs)} triples" if len(jobs) > 1 else ""))
    for job, res in zip(jobs, found):
        job.res = res
    check_networks(ctx, targets, jobs, s)
    unreadable = st.unreadable_rows()
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    failed = [job for job in jobs if not (job.run["maps_ok"] and job.run["logits_ok"])]
    folder = names.checkpoints_dir(s.store_dir)
    for job in jobs:
        if not failed:
            write_job(ctx, folder, job)
            if s.export_model:
                export(ctx, folder, job)
        print("\n".join(stage3_text.job_lines(ctx.layer_path, st.manifest["classes"], job, header=s.header)))
        if not failed:
            print(f"wrote 20 checkpoints and {job.concepts.checkpoint(ctx.name, 'best')} to {folder}")
    if failed:
        which = "; ".join(f"channel {j.concepts.channel} {j.concepts.describe()}" for j in failed)
        raise cli.UserError(f"the split does not reproduce the original layer and logits ({which}); nothing written")
