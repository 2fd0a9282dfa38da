"""Stage 4 (``get_results.py``): how well each disentangled channel separates its concepts, on the val images.

``run`` does the whole stage for the jobs of the command line (one channel and its concepts, every line of a
``--triples`` file, or the clusters of a ``--concepts_file``): read and check each job's checkpoint, choose the
val images of its concepts (the concepts' interface, ``utils.concepts.base``), one pass over the union of those
images for the per-image numbers of every job (``stage4_passes``), optionally a scan of the whole val split for
the top images, then each job's files in order (``stage4_results``): what one run per job writes, byte for byte.
Under torchrun the feature visualizations are shared out over the processes (``feature_vis_shards``).
"""
import glob
import os
from dataclasses import dataclass

import numpy as np

from utils.concepts import by_clusters, candidates
from utils.concepts.source import ConceptSource
from utils.data import folders
from utils.data.scan import ScanPlan
from utils.files import leftovers, names
from utils.stages import distributed
from utils.errors import UserError
from utils.report import stage3_text
from utils.stages import feature_vis_shards, stage4_tau
from utils.stages.stage4_checkpoints import load_checkpoint
from utils.stages.stage4_passes import checkpoint_filters, evaluate_many, scan_arvs, scan_many, shared_arvs
from utils.stages.stage4_results import Evaluated, write_job

HINT = ": replace or remove the file, or pass --skip_unreadable to leave it out"


@dataclass(frozen=True)
class Settings:
    """What stage 4 does (the flags' defaults: ``utils/run/flags.py``'s ``stage4`` takes them from here; see
    get_results.py --help). source: where the concepts come from (``ConceptSource``); num_workers None:
    ``cli.default_workers``."""
    model_dir: str
    data_dir: str = None    # the val images' folder (the store's when --data_dir is not given)
    source: ConceptSource = ConceptSource()
    val_top_n: int = None   # --concepts_file: top val images assigned to clusters (None: the file's top_n)
    rho: object = "best"    # the checkpoint's rho: a float, or "best"
    tau: float = None       # None: stage 2's (``stage4_tau``, decided in ``run``)
    qualitative: bool = False
    quantitative: bool = False
    top_images: bool = False
    top_k: int = 8
    top_images_all_val: bool = False
    unreadable: str = "error"  # "error" or "skip" (--skip_unreadable)
    out_dir: str = "."
    batch_size: int = folders.DEFAULT_BATCH_SIZE
    num_workers: int = None
    atlas: str = None       # --atlas DIR: the static site of this invocation's runs (``utils.atlas``)


def read_jobs(ctx, s):
    """The jobs' concepts, checked against the model and the val split: the command line's Triples, or the
    channel's clusters of --concepts_file, or the selection of --candidates."""
    return s.source.read(ctx, "--channel_of_interest", ctx.dataset.classes, keys=by_clusters.MODEL_KEYS)


def run(ctx, s, extras):
    """Stage 4 with the model, data and layer of ``ctx`` and the Settings ``s``.

    extras.check(): refuses the extras' settings (after the concepts are read, before any checkpoint is);
    extras(job, state_dict, run_name, index, concept): the feature visualizations and the SAE view of one job,
    returning their summary entries (see ``stage4_results.write_job``); extras.prepare([(run name, channel,
    state_dict)]): called once before the val images are read (the batched feature visualizations);
    extras.share / join / stop: under torchrun, the feature visualizations shared out over the processes
    (``feature_vis_shards``; rank 0 does everything else).
    """
    distributed.init(ctx.device, timeout_hours=feature_vis_shards.TIMEOUT_HOURS)  # only under torchrun
    s = stage4_tau.resolve(ctx, s, quiet=distributed.world()[0] != 0)  # rank 0 says which tau
    try:
        _run(ctx, s, extras)
    finally:  # also after an error: a process group left open aborts the interpreter's exit (gloo's threads)
        distributed.close()


def _run(ctx, s, extras):
    leftovers.sweep(names.plot(s.out_dir, ""), names.result(s.out_dir, ""), names.quantitative_dir(s.out_dir),
                    os.path.dirname(names.spectrum_cache(s.model_dir, 0, "")),
                    os.path.dirname(names.sae_cache(s.model_dir, "")))  # what a killed run left (leftovers)
    jobs = read_jobs(ctx, s)
    extras.check()
    summary_of_val = folders.dataset_summary(ctx.dataset)
    checkpoints = [load_checkpoint(ctx, s.model_dir, job, s.rho, summary_of_val) for job in jobs]
    extras.prepare([(names.run_name(c.name), job.channel, c.state_dict) for job, c in zip(jobs, checkpoints)])
    if distributed.world()[0] != 0:  # another torchrun process: its share of the feature visualizations only
        return extras.join()
    try:
        evaluated = evaluate(ctx, s, jobs, checkpoints)
    except UserError as e:
        extras.stop(str(e))
        raise
    extras.share({e.run_name: e.job.featurevis_concepts(e.r["index"], e.concept) for e in evaluated})
    for e in evaluated:
        if s.source.header:
            print(stage3_text.header_line(e.job))
        write_job(ctx, s, e, extras)
    if s.atlas is not None:
        write_atlas(s, [names.run_name(c.name) for c in checkpoints])


def evaluate(ctx, s, jobs, checkpoints):
    """The jobs' val images (for concepts as clusters: one pass over the val split for the ARVs of as many jobs'
    channels as ``stage4_passes.ARV_BYTES`` holds), one forward and head-only backward over the union of the
    images of the jobs of classes (each image once) and one over each cluster job's own top images
    (``pass_groups``), the scan of the whole val split for --top_images_all_val: [Evaluated] in the jobs'
    order, every job checked."""
    ds = ctx.dataset
    plan = ScanPlan(ds, s.batch_size, ctx.device, folders.default_workers(s.num_workers), s.unreadable, HINT,
                    ctx.class_outputs)

    def scan_channels(channels, indices):  # the pass that chooses val images by activation (concepts as clusters)
        return scan_arvs(ctx.model, ctx.conv, channels, plan, indices)
    arvs = shared_arvs(scan_channels, [job.channel for job in jobs], len(ds) * (ctx.conv.weight.shape[1] + 1) * 8)
    vals = []
    for job in jobs:
        vals.append(job.val_images(ds, s.data_dir, s.val_top_n, arvs))
        if vals[-1].note:
            print(vals[-1].note)
    filters = [checkpoint_filters(c.state_dict) for c in checkpoints]
    runs = [(job.channel, f, b, v.classes) for job, (f, b), v in zip(jobs, filters, vals)]
    results = [None] * len(jobs)
    for group in pass_groups(vals):
        indices = sorted(set().union(*(vals[i].indices for i in group)))
        done = evaluate_many(ctx.model, ctx.conv, [runs[i] for i in group], plan, indices)
        for i, r in zip(group, done):
            results[i] = r
    whole = [None] * len(jobs)
    if s.top_images and s.top_images_all_val:
        scanned, pos = scan_many(ctx.model, ctx.conv, [(job.channel, f, b) for job, (f, b) in zip(jobs, filters)],
                                 plan, list(range(len(ds))))
        whole = [(scanned, o, m) for o, m in pos]
    concepts = [concept_ids(job, v, r) for job, v, r in zip(jobs, vals, results)]  # all checked before writing
    return list(map(Evaluated, jobs, checkpoints, results, whole, concepts, vals))


def pass_groups(vals):
    """The jobs (by position) that share one pass of ``evaluate_many``: every job whose val images are its
    classes' in one pass; a job whose images were picked one by one (``ValImages.assigned``: concepts as
    clusters) in a pass of its own, batched as when it runs alone (a pass keeps a run's images by class)."""
    by_class = [i for i, v in enumerate(vals) if not v.assigned]
    return ([by_class] if by_class else []) + [[i] for i, v in enumerate(vals) if v.assigned]


def write_atlas(s, runs):
    """--atlas: the site of ``runs``, with stage 2's candidates for the cosine column (the --candidates file, or
    the store's one candidates file where there is exactly one)."""
    from utils.atlas.write import size_text, write_atlas as write
    from tqdm import tqdm
    done = write(s.out_dir, s.model_dir, runs, s.atlas, candidates_file(s),
                 progress=lambda rows: tqdm(rows, desc="atlas pages", unit="page"))
    print(f"wrote the atlas of {done['runs']} runs to {done['folder']} ({size_text(done)}); open "
          f"{names.atlas_index(done['folder'])} in a browser")


def candidates_file(s):
    """The stage-2 candidates file for the atlas's cosine column, or None."""
    if s.source.candidates is not None and candidates.is_candidates_file(s.source.candidates):
        return s.source.candidates
    found = glob.glob(names.candidates_json(glob.escape(s.model_dir), "*"))
    return found[0] if len(found) == 1 else None


def concept_ids(job, val, r):
    """(N,) concept id 1..k of each of the evaluated images of ``r``; UserError where a concept has none."""
    concept = np.asarray(job.val_ids(val, r["label"], r["index"]), dtype=np.int64)
    for j in range(1, job.k + 1):
        if not (concept == j).any():
            raise UserError(f"{job.where + ': ' if job.where else ''}{job.no_val_images(j)}")
    return concept
