"""What stages 3 and 4 wrote for a set of runs, read into plain dict rows (one per stage-4 run).

A row holds the numbers the atlas shows (channel, concepts by name, cosine, best rho, separations,
quantitative means, top-image purity) and ``files``: {key: path of the file behind it, or None}. Reading a
row opens only the run's small JSON files; images are not opened here.

The files may come from anyone: a field the rows are built from (a list, an object, an integer id) of another
type is refused with one line naming the file and the field (``expect``); the values shown (numbers, names)
are taken as they are and made safe where they reach HTML (``utils.atlas.safe``).
"""
import glob
import json
import os
import re
from collections import Counter

from utils.atlas.safe import finite
from utils.files import names
from utils.errors import UserError

RUN_NAME = re.compile(r"^(?P<name>.*)_channel(?P<channel>\d+)_")


def read_json(path, what):
    """A JSON file, or a one-line UserError naming ``what`` it is."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e})")


def expect(value, kinds, path, field, what):
    """``value`` where it is None or one of ``kinds``, else a one-line UserError naming the file and field."""
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    raise UserError(f"{path}: {field} is {type(value).__name__}, not {what}; rewrite the file with the stage that "
                    f"wrote it")


def checked_summary(summary, path):
    """A stage-4 summary whose fields the rows are built from have their types (else a one-line UserError)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("channel"), int) or \
            isinstance(summary.get("channel"), bool) or not concept_count(summary):
        raise UserError(f"{path}: not a stage-4 summary (no channel or no separations)")
    for key, value in summary.items():
        if re.fullmatch(r"(class_names|classes)\d+|clusters", key):
            expect(value, list, path, key, "a list")
        elif re.fullmatch(r"quantitative_concept\d+|top_images", key):
            expect(value, dict, path, key, "an object")
    expect(summary.get("checkpoint"), str, path, "checkpoint", "a file name")
    for key, paths in (summary.get("top_images") or {}).items():
        expect(paths, list, path, f"top_images[{key!r}]", "a list")
        for p in paths or []:
            expect(p, str, path, f"top_images[{key!r}]", "a list of paths")
    return summary


def runs_found(out_dir):
    """The runs with a summary under ``out_dir/results_disentanglement``, sorted by name."""
    return sorted(names.run_of_summary(p) for p in glob.glob(names.all_summaries(out_dir)))


def concept_count(summary):
    """k: the number of concepts with a separation in the summary."""
    return sum(1 for key in summary if re.fullmatch(r"sep_concept\d+", key))


def concept_labels(summary, k):
    """How the atlas names each concept: its classes by name, or ``cluster j``."""
    if "clusters" in summary:
        return [f"cluster {j}" for j in summary["clusters"]]
    return [", ".join(map(str, summary.get(f"class_names{j}") or summary.get(f"classes{j}") or []))
            for j in range(1, k + 1)]


def top_purity(paths):
    """Share of images in their most common class folder (the parent folder's name); None without images."""
    if not paths:
        return None
    return Counter(os.path.basename(os.path.dirname(p)) for p in paths).most_common(1)[0][1] / len(paths)


def purities(summary, k):
    """(purity of the original channel's top images, [purity of D_j's top images]) or Nones."""
    top = summary.get("top_images") or {}
    return top_purity(top.get("Original")), [top_purity(top.get(f"Disentangled {j}")) for j in range(1, k + 1)]


def separations(summary, k):
    """([sep_j or None], [why sep_j is None, or None]). A separation is None where its denominator is 0
    (unbounded): stage 4 writes null and ``sep_concept{j}_reason``; a summary written before that holds the
    quotient by 1e-12 (about 1e13), recognised here by its means (``mean_pos_concept{j}``) and read as None, so
    that it neither shows nor sorts as a number."""
    seps, reasons = [], []
    for j in range(1, k + 1):
        sep, reason = summary.get(f"sep_concept{j}"), summary.get(f"sep_concept{j}_reason")
        means = summary.get(f"mean_pos_concept{j}") or {}
        others = [means.get(f"D{m}") for m in range(1, k + 1) if m != j]
        if sep is not None and others and all(isinstance(v, (int, float)) and v == 0 for v in others):
            sep, reason = None, f"unbounded: the mean of the other maps over concept {j}'s val images is 0"
        if not isinstance(sep, (int, float)) or isinstance(sep, bool):
            sep = None
        seps.append(sep)
        reasons.append(None if sep is not None else (str(reason) if reason else None))
    return seps, reasons


def own_quantitative(summary, k):
    """[mean of D_j/orig over concept j's val images] (None where stage 4 computed none)."""
    return [(summary.get(f"quantitative_concept{j}") or {}).get(f"D{j}/orig") for j in range(1, k + 1)]


def cosine_lookup(candidates_json):
    """{(channel, class1, class2) with class1 < class2: cosine} from stage 2's candidates file (empty without)."""
    if not candidates_json:
        return {}
    rec = read_json(candidates_json, "stage 2's candidates")
    if not isinstance(rec, dict) or not isinstance(rec.get("candidates"), list):
        raise UserError(f"{candidates_json}: not a candidates file of stage 2 (no 'candidates' list)")
    for i, d in enumerate(rec["candidates"]):
        expect(d, dict, candidates_json, f"candidate {i}", "an object")
        for key in ("channel", "class1", "class2"):
            if not isinstance(d.get(key), int) or isinstance(d.get(key), bool):
                raise UserError(f"{candidates_json}: candidate {i} has no integer {key!r}; rewrite it with stage 2")
    return {(d["channel"], *sorted((d["class1"], d["class2"]))): d.get("cosine_similarity") for d in rec["candidates"]}


def cosine_of(summary, cosines):
    """The candidate's cosine for a two-concept split of one class each, else None."""
    c1, c2 = summary.get("classes1"), summary.get("classes2")
    if "classes3" in summary or not c1 or not c2 or len(c1) != 1 or len(c2) != 1:
        return None
    if not all(isinstance(c[0], int) and not isinstance(c[0], bool) for c in (c1, c2)):
        return None  # no candidate names a class that is not an integer
    return cosines.get((summary["channel"], *sorted((c1[0], c2[0]))))


def label_free_records(store_dir, name, cache):
    """{channel: (concepts file, its record of the channel)} of every concepts file of ``name`` (read once)."""
    if name not in cache:
        found = {}
        for path in sorted(glob.glob(names.all_concepts_files(store_dir, name))):
            record = expect(read_json(path, "a concepts file"), dict, path, "the file", "an object")
            for c, rec in (expect(record.get("channels"), dict, path, "channels", "an object") or {}).items():
                if not (c.isascii() and c.isdigit()):
                    raise UserError(f"{path}: channel {c!r} is not a channel number; rewrite it with stage 2")
                expect(rec, dict, path, f"channel {c}", "an object")
                for i, cl in enumerate(expect(rec.get("clusters"), list, path, f"channel {c}'s clusters", "a list")
                                       or []):
                    expect(cl, dict, path, f"channel {c}'s cluster {i}", "an object")
                    expect(cl.get("classes"), dict, path, f"channel {c}'s cluster {i} classes", "an object")
                found.setdefault(int(c), (path, rec))
        cache[name] = found
    return cache[name]


def existing(path):
    return path if path and os.path.isfile(path) else None


def run_files(out_dir, store_dir, run, summary, k):
    """{key: path or None} of the files behind one run's numbers and pictures."""
    checkpoint = os.path.join(names.checkpoints_dir(store_dir), os.path.basename(summary.get("checkpoint") or run))
    fv, sae = names.feature_vis_files(out_dir, run, ""), names.sae_view_files(out_dir, run)
    files = {f"density{j}": names.density_plots(out_dir, j, "", run)[1] for j in range(1, k + 1)}
    files.update(top_images=names.top_images_plots(out_dir, "", run)[1], feature_vis=fv["figure"],
                 feature_vis_raw=fv["raw"], feature_vis_json=fv["record"], sae_view=sae["figure"],
                 sae_view_json=sae["record"], summary=names.summary(out_dir, run),
                 info=names.info_file(checkpoint), scores=names.scores_plot(checkpoint))
    return {key: existing(p) for key, p in files.items()}


def read_run(out_dir, store_dir, run, cosines, label_free_cache):
    """One row of the atlas for stage-4 run ``run``."""
    summary = checked_summary(read_json(names.summary(out_dir, run), "a stage-4 summary"), names.summary(out_dir, run))
    k = concept_count(summary)
    files = run_files(out_dir, store_dir, run, summary, k)
    info = expect(read_json(files["info"], "a stage-3 info file"), dict, files["info"], "the file", "an object") \
        if files["info"] else {}
    match = RUN_NAME.match(run)
    lf = label_free_records(store_dir, match.group("name"), label_free_cache).get(summary["channel"]) if match else None
    purity_original, purity_parts = purities(summary, k)
    sep, sep_reason = separations(summary, k)
    return {"run": run, "channel": summary["channel"], "layer": summary.get("layer"), "k": k,
            "concepts": concept_labels(summary, k), "cosine": cosine_of(summary, cosines),
            "rho": summary.get("rho"), "max_logit_diff": summary.get("max_logit_diff"),
            "exact": info.get("exact"), "sep": sep, "sep_reason": sep_reason,
            "val_images": [summary.get(f"val_images_concept{j}") for j in range(1, k + 1)],
            "quantitative": own_quantitative(summary, k),
            "quantitative_all": [summary.get(f"quantitative_concept{j}") for j in range(1, k + 1)],
            "purity_original": purity_original,
            "purity_parts": purity_parts, "files": files,
            "label_free": None if lf is None else {"file": lf[0], **summary_of_clusters(lf[1])}}


def summary_of_clusters(rec):
    """What the atlas shows of a channel's label-free concepts: k, silhouette, purity, and each cluster's size,
    purity and three largest classes."""
    clusters = [{"size": cl.get("size"), "purity": cl.get("purity"),
                 "classes": sorted((cl.get("classes") or {}).items(), key=largest_first)[:3]}
                for cl in rec.get("clusters") or []]
    return {"k": rec.get("k"), "silhouette": rec.get("silhouette"), "purity": rec.get("purity"), "clusters": clusters}


def largest_first(name_count):
    """Sort key of a cluster's (class, count): counts in decreasing order, a count that is no number last."""
    n = name_count[1]
    return (0, -n) if finite(n) else (1, 0)


def collect(out_dir, store_dir, runs=None, candidates_json=None):
    """The rows of ``runs`` (None: every summary under ``out_dir``), sorted by channel then run name."""
    if not os.path.isdir(names.result(out_dir, "")):
        raise UserError(f"{out_dir}: no {names.RESULTS_DIR}/ folder; pass stage 4's --out_dir")
    runs = runs_found(out_dir) if runs is None else list(runs)
    if not runs:
        raise UserError(f"{out_dir}: no stage-4 run found (no {names.RESULTS_DIR}/*_summary.json)")
    missing = [r for r in runs if not os.path.isfile(names.summary(out_dir, r))]
    if missing:
        raise UserError(f"run {missing[0]}: no summary {names.summary(out_dir, missing[0])}")
    cosines, cache = cosine_lookup(candidates_json), {}
    rows = [read_run(out_dir, store_dir, r, cosines, cache) for r in runs]
    return sorted(rows, key=lambda row: (row["channel"], row["run"]))
