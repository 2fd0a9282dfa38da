"""The registry of quantitative runs: every stage-4 run's rows, and the published text files written from it.

``runs_{prefix}required{tau}.json`` maps a run's name to its meta data and its rows per concept (D1/orig ..
Dk/orig, R/orig of the images with relative attribution >= tau); from it, each run rewrites
``quantitative_{prefix}concept{j}_required{tau}.txt`` (every run's rows of concept j, in run order) and
``means_{prefix}required{tau}.txt`` (the column means per run and over all runs). A rerun replaces its own rows
instead of appending duplicates. Runs that finish at the same time take turns (a lock next to the record), so none
of their rows is lost. ``prefix`` (``names.registry_prefix``): '' for the published files; the layer's name for
another layer than the model's last conv (so that the means of two layers never mix); ``k3_`` ... for k > 2.
"""
import os

import numpy as np

from utils.files import atomic, names
from utils.method.evaluation import column_means


REWRITE = ("delete it (and the quantitative_* and means_* files beside it) and rerun get_results.py --quantitative "
           "for each run it held")


def format_rows(rows):
    """One ``v1,v2,...`` line per row."""
    return "".join(",".join("nan" if v is None else f"{v}" for v in row) + "\n" for row in rows)


def _fmt(m):
    return ",".join(f"{v:.6g}" for v in m)


def update_quantitative(folder, prefix, tau, run_key, rows_by_concept, meta):
    """Record this run's rows under ``run_key`` and rewrite the text files from all runs (see the module).

    rows_by_concept: {1: (M1, k+1), ..., k: (Mk, k+1)}; meta: what the record keeps beside the rows.
    Returns the overall means {concept: ((k+1,) array or None, row count)}.
    """
    k = len(rows_by_concept)
    os.makedirs(folder, exist_ok=True)
    # several stage-4 processes may finish at once: the read-modify-write of the record is serialized
    with atomic.FileLock(names.registry_lock(folder, prefix, tau), wait=True):
        reg_path = names.registry(folder, prefix, tau)
        runs = atomic.read_json(reg_path, REWRITE) if os.path.isfile(reg_path) else {}
        runs[run_key] = dict(meta, **{f"concept{j}": np.asarray(rows_by_concept[j]).tolist()
                                      for j in range(1, k + 1)})
        atomic.write_json(reg_path, runs, indent=None)
        return _write_files(folder, prefix, tau, runs, k)


def _write_files(folder, prefix, tau, runs, k):
    """The rows files and the means file from the record ``runs``; returns the overall means."""
    width = k + 1
    lines = ["run,concept,images," + ",".join(f"mean_D{j}/orig" for j in range(1, k + 1)) + ",mean_R/orig"]
    overall = {}
    for concept in range(1, k + 1):
        allrows = [r for run in runs.values() for r in run[f"concept{concept}"]]
        atomic.write_text(names.quantitative_rows(folder, prefix, concept, tau), format_rows(allrows))
        for key, run in runs.items():
            rows = np.asarray(run[f"concept{concept}"], dtype=np.float64).reshape(-1, width)
            lines.append(f"{key},{concept},{len(rows)},{_fmt(column_means(rows, width))}")
        arr = np.asarray(allrows, dtype=np.float64).reshape(-1, width)
        overall[concept] = (arr.mean(axis=0) if len(arr) else None, len(arr))
    for concept in range(1, k + 1):
        m, n = overall[concept]
        lines.append(f"ALL,{concept},{n},{_fmt(m if m is not None else [float('nan')] * width)}")
    atomic.write_text(names.quantitative_means(folder, prefix, tau), "\n".join(lines) + "\n")
    return overall
