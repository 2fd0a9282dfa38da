"""Stage 3: split a channel into one channel per concept for every rho, pick the best rho, check, write.

One process splits any number of jobs (``--triples``) with one model load and one pass: the concepts' ARVs
v_1 .. v_k come in closed form from the store's patch sums (one read per distinct set of rows); the split
filters of every rho (``utils.method.split``) of every job are scored in one scan over the union of their
training images, in batches of one class each (``by_classes.class_batches``: each image is computed in the
same batch whatever else is scored, so a job's files are those of a run of it alone); the full original and
disentangled networks' logits are compared at each job's chosen rho; then, if every job is exact, each
job's 20 checkpoints, the best one, ``…_info.json`` and ``…_scores.png`` are written (``utils.files.names``).
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.model import disentangled as disentangle
from utils.concepts import candidates
from utils.concepts.by_classes import class_batches
from utils.concepts.source import ConceptSource
from utils.data import folders, scan
from utils.files import atomic, digests, leftovers, names, store
from utils.method import rho_scores, similarities
from utils.method.split import (RHOS, TOLERANCE, checkpoint_state_dict, split_filters_k, split_sources_k,
                                within_tolerance)
from utils.report import stage3_text
from utils import finite
from utils.errors import UserError

HINT = (": the store read it, so the file changed since stage 1; restore it, or rerun stage 1 with "
        "--skip_unreadable into a new --store_dir")


@dataclass(frozen=True)
class Settings:
    """What stage 3 was asked (the flags' defaults: ``utils/run/flags.py``'s ``stage3`` takes them from here).
    source: where the concepts come from (``ConceptSource``: classes, a concepts file or a candidates file);
    num_workers None: ``cli.default_workers``."""
    store_dir: str
    source: ConceptSource = ConceptSource()
    rho_score: str = "published"
    exactness_images: int = 4
    channels_last: bool = True
    export_model: bool = False
    batch_size: int = folders.DEFAULT_BATCH_SIZE
    num_workers: int = None

    def __post_init__(self):
        if self.exactness_images < 1:
            raise UserError("--exactness_images must be at least 1")


def checkpoint_path(ctx, folder, concepts, rho):
    """The path in ``folder`` of the checkpoint at ``rho`` (a float or "best") of a job's ``concepts``."""
    return os.path.join(folder, concepts.checkpoint(ctx.name, rho))


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
        return checkpoint_path(ctx, folder, self.concepts, rho)


def make_jobs(conv, patch_sums, concepts, rows, means=None):
    """The Job of each ``Concepts``: its ARVs v_1 .. v_k (closed form from the store's patch sums, one read per
    distinct set of rows; ``means``: {rows: mean patch sums} kept across calls) and the split filters of every
    rho."""
    means, jobs = {} if means is None else means, []
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
    plan = scan.ScanPlan(ds, s.batch_size, ctx.device, folders.default_workers(s.num_workers), hint=HINT,
                         channels_last=s.channels_last)
    images = scan.scan(model, ctx.conv, plan, batches, what=scan.INPUT_OUTPUT, desc=desc)
    return rho_scores.score_splits(ctx.conv, splits, images, ctx.device)


def exactness_images(ctx, targets, n):
    """The first ``n`` readable training images: (their indices, the (n, 3, H, W) batch on the device)."""
    check = np.flatnonzero(targets >= 0)[:n].tolist()
    return check, next(iter(folders.make_loader(ctx.dataset, [check], 0, ctx.device, hint=HINT)))[0].to(ctx.device)


@dataclass
class Shared:
    """What the chunks of one run share: the store's ``targets``, ``means`` (``make_jobs``), ``exact``: (indices,
    images, the original network's logits) of the exactness images, made at the first check (after the model's
    first scan, which may have made it channels-last), and whether the unreadable images were reported."""
    targets: object
    means: dict = field(default_factory=dict)
    exact: tuple = None
    said_unreadable: bool = False

    def exactness(self, ctx, n):
        if self.exact is None:
            check, images = exactness_images(ctx, self.targets, n)
            self.exact = check, images, disentangle.logits(ctx.model, images)
        return self.exact


def check_networks(ctx, shared, jobs, s):
    """The full original and disentangled networks' logits at each job's chosen rho on the first
    ``s.exactness_images`` readable training images: the same images whatever the jobs, so the original's
    logits are computed once (``Shared.exactness``) and each job's numbers equal those of a run of it alone.
    Sets each job's ``run``."""
    for job in jobs:  # a NaN score has no maximum: one line, not an IndexError in best_rho_index
        finite.refuse_nonfinite(job.res.scores, f"the 20 rho scores of channel {job.concepts.channel} "
                                                f"{job.concepts.describe()}",
                                "the layer's input or the channel's maps are not finite on its training images "
                                "(check the model and the store): no rho can be chosen, nothing written")
    check, images, original = shared.exactness(ctx, s.exactness_images)
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
    info = info_record(ctx, job, best_path)
    info["checkpoint_sha256"] = {os.path.basename(p): digests.sha256(p) for p in
                                 [job.checkpoint(ctx, folder, rho) for rho in RHOS] + [best_path]}
    atomic.write_json(names.info_file(best_path), info)
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
    s.source.check(ctx, "--channel_disentangle")
    st = store.Store.open(ctx.spec.store_folder, ctx.fingerprint)  # the folder context.setup found
    targets = st.labels()
    return st, targets, s.source.read(ctx, "--channel_disentangle", st.manifest["classes"], num_rows=len(targets))


CHUNK = 8  # --candidates: jobs scored and written together; an interruption loses at most one chunk's work


def job_files(ctx, folder, concepts):
    """Every file stage 3 writes for one job: the 20 checkpoints, the best one, the info file, the plot."""
    cks = [checkpoint_path(ctx, folder, concepts, rho) for rho in (*RHOS, "best")]
    return cks + [names.info_file(cks[-1]), names.scores_plot(cks[-1])]


def is_complete(ctx, folder, concepts, rho_score):
    """Whether a previous run wrote every file of the job, with an info file of the same store, concepts and
    best-rho score, and checkpoints whose sha256 is the one the info file recorded (an info file written
    before they were recorded: checkpoints that are not empty). A damaged file makes the job run again."""
    files = job_files(ctx, folder, concepts)
    if not all(os.path.isfile(f) and os.path.getsize(f) > 0 for f in files):
        return False
    try:
        info = atomic.read_json(files[-2])
    except (OSError, ValueError):
        return False
    recorded = info.get("checkpoint_sha256") if isinstance(info, dict) else None
    if isinstance(recorded, dict) and any(recorded.get(os.path.basename(f)) != digests.sha256(f)
                                          for f in files[:-2]):
        return False
    wanted = json.loads(json.dumps(dict(ctx.fingerprint, channel=concepts.channel, **concepts.info_keys(),
                                        rho_score=rho_score)))
    return isinstance(info, dict) and all(info.get(k) == v for k, v in wanted.items())


def jobs_to_run(ctx, s, concepts):
    """--candidates: the jobs without complete files (a line for each one skipped); otherwise every job."""
    if s.source.candidates is None:
        return concepts
    folder, todo = names.checkpoints_dir(s.store_dir), []
    for t in concepts:
        if is_complete(ctx, folder, t, s.rho_score):
            print(f"channel {t.channel} {t.describe()}: its files are complete in {folder}, skipped")
        else:
            todo.append(t)
    return todo


def run(ctx, s):
    """Stage 3 for the settings ``s`` in the context ``ctx`` (model, layer, training data)."""
    leftovers.sweep(names.checkpoints_dir(s.store_dir))  # what a killed run left (``utils.files.leftovers``)
    st, targets, concepts = read_concepts(ctx, s)
    todo = jobs_to_run(ctx, s, concepts)
    rows = [t.training_rows(targets) for t in todo]  # every job checked before any work
    step = CHUNK if s.source.candidates is not None else max(1, len(todo))
    shared = Shared(targets)
    for start in range(0, len(todo), step):
        split_and_write(ctx, s, (st, shared), todo[start:start + step], rows[start:start + step])
    if s.source.candidates is not None and s.export_model:
        export_whole_layer(ctx, s, shared, concepts)


def split_and_write(ctx, s, store_shared, concepts, rows):
    """Score, check and write the jobs of ``concepts`` (their training ``rows``) in one pass over their images.
    store_shared: the store and what the run's chunks share (``Shared``)."""
    st, shared = store_shared
    jobs = make_jobs(ctx.conv, st.array("patch_sums"), concepts, rows, shared.means)
    # one pass over every concept image of every job, each image once, in batches of one class
    indices = np.unique(np.concatenate([r for rs in rows for r in rs]))  # store rows are ImageFolder indices
    found = score_images(ctx, [job.split for job in jobs], indices, s,
                         "scoring 20 rho" + (f" of {len(jobs)} triples" if len(jobs) > 1 else ""))
    for job, res in zip(jobs, found):
        job.res = res
    check_networks(ctx, shared, jobs, s)
    unreadable = st.unreadable_rows()
    if len(unreadable) and not shared.said_unreadable:  # once per run
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
        shared.said_unreadable = True
    failed = [job for job in jobs if not (job.run["maps_ok"] and job.run["logits_ok"])]
    folder = names.checkpoints_dir(s.store_dir)
    for job in jobs:
        if not failed:
            write_job(ctx, folder, job)
            if s.export_model and s.source.candidates is None:
                export(ctx, folder, job)
        print("\n".join(stage3_text.job_lines(ctx.layer_path, st.manifest["classes"], job, header=s.source.header)))
        if not failed:
            print(f"wrote 20 checkpoints and {job.concepts.checkpoint(ctx.name, 'best')} to {folder}")
    if failed:
        which = "; ".join(f"channel {j.concepts.channel} {j.concepts.describe()}" for j in failed)
        raise UserError(f"the split does not reproduce the original layer and logits ({which}); nothing written")


def export_whole_layer(ctx, s, shared, concepts):
    """--export_model with --candidates: the whole-layer network of every channel of the selection (each at its
    best rho, read from its checkpoint), checked on the exactness images, then written."""
    from utils.model import whole_layer
    folder = names.checkpoints_dir(s.store_dir)
    best = {t.channel: checkpoint_path(ctx, folder, t, "best") for t in concepts}
    net = whole_layer.build_whole_layer_model(ctx.model, ctx.layer_path,
                                              {c: whole_layer.read_checkpoint(p) for c, p in best.items()})
    check, images, original = shared.exactness(ctx, s.exactness_images)
    diff, zmax = disentangle.logit_difference(original, disentangle.logits(net, images))
    if not within_tolerance(diff, zmax):
        raise UserError(f"the whole-layer network's logits differ from the original's by {diff:.3g} (max |logit| "
                            f"{zmax:.3g}) on {len(check)} training images; nothing exported")
    paths = whole_layer.export_whole_layer(names.whole_layer_model(s.store_dir, ctx.name,
                                                                   candidates.selection_label(concepts, s.source.all_classes)),
                                           net, ctx.model_spec, ctx.weights_id, ctx.layer_path, best)
    print(f"exported the whole-layer network of {len(best)} channels: " + " and ".join(paths))
    print(f"its logits equal the original's on {len(check)} training images: max difference {diff:.3g} "
          f"(max |logit| {zmax:.3g}, relative tolerance {TOLERANCE})")
