"""What stage 4 prints and writes for one job: the separations, the density curves, the quantitative rows, the
top images and the summary, each what one run of ``get_results.py`` for that job alone writes.

k is the number of the job's concepts (checked against the checkpoint): one density curve per map, one
quantitative column per map, one contact-sheet row per map. For two concepts given as classes, every file is
what the published-format path has always written. Every file name is ``utils.files.names``'.
"""
import os
from dataclasses import dataclass

from utils.data import folders
from utils.files import atomic, names, registry
from utils.method import evaluation
from utils.report.latex import filecontents_block
from utils import finite


@dataclass
class Evaluated:
    """One job after the passes. job: its concepts (``utils.concepts.base.Concepts``); ckpt: its Checkpoint;
    r: its numbers from ``evaluate_many``; whole_val: its (indices, orig_pos, maps_pos) from the whole-val scan
    for the top images, or None; concept: (N,) concept id 1..k of each of r's images; val: its ValImages."""
    job: object
    ckpt: object
    r: dict
    whole_val: tuple
    concept: object
    val: object

    @property
    def run_name(self):
        """The stem of the job's own files: its checkpoint's name without ``.pth``."""
        return names.run_name(self.ckpt.name)


def write_job(ctx, s, e, extras):
    """Print and write the results of the Evaluated job ``e`` (s: the stage's Settings).

    extras(job, state_dict, run_name, index, concept) -> the summary entries of the feature visualizations and
    the SAE view.
    """
    ds, job, ckpt, r = ctx.dataset, e.job, e.ckpt, e.r
    for key, what in (("maps_pos", "checkpoint maps"), ("orig_pos", "channel's activations"), ("rel", "relative "
                                                                                                   "attributions")):
        finite.refuse_nonfinite(r[key], f"channel {job.channel}'s {what} on the val images",
                                "the model or the checkpoint gives numbers that are not finite: nothing written")
    if r["skipped"]:
        print(f"skipped {len(r['skipped'])} unreadable val images: "
              + ", ".join(folders.relative_name(ds, i) for i in r["skipped"][:5])
              + (", ..." if len(r["skipped"]) > 5 else ""))
    summary = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": job.channel,
               **job.summary_keys(ds.classes, e.val), "checkpoint": ckpt.path,
               "rho": ckpt.info["best_rho"] if (ckpt.info and s.rho == "best") else s.rho,
               "max_logit_diff": ckpt.info.get("max_logit_diff") if ckpt.info else None,
               "unreadable_val_images": [folders.relative_name(ds, i) for i in r["skipped"]]}
    summary.update(separations(ctx, e))
    if s.qualitative:
        write_densities(ctx, s, e)
    if s.quantitative:
        summary.update(write_quantitative(ctx, s, e, summary))
    if s.top_images:
        summary["top_images"] = write_top_images(ctx, s, e)
    summary.update(extras(job, ckpt.state_dict, e.run_name, r["index"], e.concept))
    atomic.write_json(names.summary(s.out_dir, e.run_name), summary)


def _braces(k):
    """``{1,2,...,k}``: how a printed file name stands for the files of every concept."""
    return "{" + ",".join(str(j) for j in range(1, k + 1)) + "}"


def separations(ctx, e):
    """Print each concept's sep_j; return the summary entries val_images_concept{j}, sep_concept{j} and
    mean_pos_concept{j} (``evaluation.concept_separation``)."""
    job, k, out = e.job, e.job.k, {}
    for j in range(1, k + 1):
        n, sep, orig, maps = evaluation.concept_separation(e.r["orig_pos"], e.r["maps_pos"], e.concept, j)
        out[f"val_images_concept{j}"] = n
        out[f"sep_concept{j}"] = sep
        if sep is None:
            out[f"sep_concept{j}_reason"] = evaluation.separation_reason(n, maps, j)
        out[f"mean_pos_concept{j}"] = {"original": orig, **dict(zip(evaluation.map_names(k), maps))}
    print(f"channel {job.channel} of layer '{ctx.layer_path}', checkpoint {os.path.basename(e.ckpt.path)}")
    for j in range(1, k + 1):
        other = f"mean pos(D{3 - j})" if k == 2 else f"max over l != {j} of mean pos(D_l)"
        sep = out[f"sep_concept{j}"]
        print(f"concept {j} ({job.val_label(ctx.dataset.classes, j)}): {out[f'val_images_concept{j}']} val images, "
              f"mean pos(D{j}) / {other} = " + (f"{sep:.3g}" if sep is not None else out[f"sep_concept{j}_reason"]))
    return out


def write_densities(ctx, s, e):
    """Per concept: the density plot of the original channel and of D1 .. Dk (the latest run's and the run's
    own) and the curves as LaTeX ``filecontents*`` blocks."""
    from utils.report import plots  # matplotlib: only for a run that draws
    job, r, run_name = e.job, e.r, e.run_name
    k, latest = job.k, names.latest_suffix(ctx.name, ctx.tag)
    for j in range(1, k + 1):
        sel = e.concept == j
        curves = [(label, evaluation.kde_curve(vals)) for label, vals in
                  zip(plots.curve_labels(k), [r["orig"][sel]] + [r["maps"][sel, i] for i in range(k)])]
        label = job.val_label(ctx.dataset.classes, j)
        title = f"{ctx.tag} {ctx.layer_path} channel {job.channel}, concept {j}: {label}"
        for path in names.density_plots(s.out_dir, j, latest, run_name):
            plots.density_plot(path, curves, title)
        blocks = [filecontents_block(f"{n}_c{j}", *cv) for n, (_, cv) in
                  zip(["original"] + [f"disentangled{i}" for i in range(1, k + 1)], curves) if cv is not None]
        atomic.write_text(names.density_data(s.out_dir, j, latest), "".join(blocks))
    print(f"wrote {names.density_plots(s.out_dir, _braces(k), latest, run_name)[0]} and "
          f"{names.density_data(s.out_dir, _braces(k), latest)}")


def write_quantitative(ctx, s, e, summary):
    """The rows D1/orig .. Dk/orig, R/orig of each concept's images with rel >= tau into the registry of
    quantitative runs (``utils.files.registry``); print their means. Returns the summary entries
    quantitative_concept{j}; ``summary``: the entries so far (val_images_concept{j} are printed)."""
    k, tau, r, concept = e.job.k, s.tau, e.r, e.concept
    rows = {j: evaluation.quantitative_rows(r["maps"][concept == j], r["orig"][concept == j],
                                            r["rel"][concept == j], tau) for j in range(1, k + 1)}
    folder = names.quantitative_dir(s.out_dir)
    prefix = names.registry_prefix(ctx.name, ctx.tag, k)
    overall = registry.update_quantitative(folder, prefix, tau, e.run_name, rows,
                                           {"model": ctx.model_spec, "layer": ctx.layer_path})
    columns = [f"{n}/orig" for n in evaluation.map_names(k)]
    out = {}
    for j in range(1, k + 1):
        m = evaluation.column_means(rows[j], k + 1)
        out[f"quantitative_concept{j}"] = {"images": len(rows[j]), **{col: float(v) for col, v in zip(columns, m)}}
        if not len(rows[j]):  # strict JSON: null, and why
            out[f"quantitative_concept{j}"] = {"images": 0, **{col: None for col in columns}}
            out[f"quantitative_concept{j}_reason"] = (f"no val image of concept {j} has relative attribution >= "
                                                      f"{tau}: the means are undefined")
        om, on = overall[j]
        print(f"concept {j}: {len(rows[j])} of {summary[f'val_images_concept{j}']} val images have relative "
              f"attribution >= {tau}; column means " + " ".join(f"{col}={v:.4f}" for col, v in zip(columns, m))
              + (f" | all runs in the file: {on} images, " + " ".join(f"{v:.4f}" for v in om)
                 if om is not None else ""))
    print(f"wrote {names.quantitative_rows(folder, prefix, _braces(k), tau)} and "
          f"{os.path.basename(names.quantitative_means(folder, prefix, tau))}")
    return out


def write_top_images(ctx, s, e):
    """The contact sheet of the val images activating the original channel and each D_j the most (the latest
    run's and the run's own). Returns the summary entry top_images: {row label: [image paths]}."""
    from utils.report import plots  # matplotlib: only for a run that draws
    ds, job, run_name = ctx.dataset, e.job, e.run_name
    k, latest = job.k, names.latest_suffix(ctx.name, ctx.tag)
    scanned, orig_pos, maps_pos = e.whole_val or (list(e.r["index"]), e.r["orig_pos"], e.r["maps_pos"])
    rows, top = [], {}
    for label, score in zip(plots.curve_labels(k), [orig_pos] + [maps_pos[:, i] for i in range(k)]):
        pick = [scanned[i] for i in evaluation.top_k(score, s.top_k)]
        top[label] = pick
        rows.append((label, [(ds.samples[i][0], ds.classes[ds.targets[i]]) for i in pick]))
    scope = "all val images" if s.top_images_all_val else job.val_scope()
    for path in names.top_images_plots(s.out_dir, latest, run_name):
        plots.contact_sheet(path, rows, title=f"{ctx.tag} {ctx.layer_path} channel {job.channel}: top {s.top_k} "
                                              f"of {scope} by pos(map)",
                            resize=ctx.transform.resize, crop_size=ctx.transform.crop)
    print(f"wrote {names.top_images_plots(s.out_dir, latest, run_name)[0]}")
    return {key: [ds.samples[i][0] for i in v] for key, v in top.items()}
