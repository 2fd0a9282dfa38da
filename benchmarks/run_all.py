"""Run the four stage benchmarks (ours against the published algorithm, plus the older naive baselines)
and print one table with the end-to-end ratio.

  python -m benchmarks.run_all [--json FILE] [--workdir DIR] [workload flags]

The issue's 600-train / 100-val case at the paper's resolution (many minutes on 2 CPU cores):

  nice python -m benchmarks.run_all --classes 6 --train_per_class 100 --val_per_class 17 \\
      --resize 256 --crop 224 --repeat 1 --no_naive --json bench_600.json

Each implementation runs in a fresh child process on the same generated workload (benchmarks/workload.py) with
the same torch thread count (--threads, default os.cpu_count()): seconds = wall time of the stage's
work (imports and base-model construction excluded, on all sides; the fastest of --repeat runs in the
same process, one run for the naive stages 2 and 3, which make dozens of passes); peak MB = the child's
VmHWM (peak resident set, /proc/self/status), which includes the interpreter, torch and the model: the
resident set just before the measured part is shown in parentheses. End to end = the sum of the four
stages' seconds. Each published baseline's numbers are checked against ours (attributions, labels and
predictions; the candidate list and cosines; the rho scores and best rho; the stage-4 numbers).
--json writes per stage ours_s, published_s, ratio (published/ours), the peaks, the naive columns,
the checks, and the stores' bytes per image.

Rows triples (not part of end to end; --no_triples skips them): benchmarks/bench_triples.py, the paper's 20
triples through the call scripts (stages 3 and 4) in one process (--triples) against one process per triple
(PER_TRIPLE=1), on their own workload (24 classes x --triples_train / --triples_val generated JPEGs, ResNet-50
with random weights); the two sides' files are compared byte for byte.

Row fv (not part of end to end; --no_fv skips it): feature visualization (stage 4's --get_feature_vis) of
the original channel and D1, D2 of a checkpoint on the same architecture and layer at S = 224, --fv_steps
steps of --fv_crops crops: ours (the three targets in one batch, the forward pass stopped at the layer)
against three separate full-network runs of the same optimization, as a generic feature-visualization
library does it (benchmarks/bench_featurevis.py); its "published" column is that separate baseline.
"""
import argparse
import dataclasses
import json
import os
import platform
import time

from benchmarks import bench_featurevis, bench_stage1, bench_stage2, bench_stage3, bench_stage4, bench_triples
from benchmarks import measure, workload

# the issue's goals against the published algorithm on the 600-image case (published / ours)
GOALS = {"1": 1.6, "2": 50.0, "3": 2.0, "4": 1.5, "end to end": 4.0}
GOAL_TRIPLES = 3.0  # the 20 triples in one process against one process per triple


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--workdir", default=None, help="keep the workload here (default: a temporary folder)")
    p.add_argument("--fv_steps", type=int, default=3, help="steps of the feature-visualization row (default 3)")
    p.add_argument("--fv_crops", type=int, default=4, help="crops per image per step of that row (default 4)")
    p.add_argument("--no_fv", action="store_true", help="skip the feature-visualization row")
    p.add_argument("--no_triples", action="store_true", help="skip the rows of the paper's 20 triples")
    p.add_argument("--triples_train", type=int, default=8,
                   help="train images per class of the triples rows' 24 classes (default 8)")
    p.add_argument("--triples_val", type=int, default=4,
                   help="val images per class of the triples rows' 24 classes (default 4)")
    workload.add_args(p)
    args = p.parse_args(argv)
    wl = workload.Workload.from_args(args)
    import torch
    start = time.perf_counter()
    print(f"workload: {wl.describe()}; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    cpu0 = os.times()
    rows = {}
    with measure.workdir_from(wl, args.workdir) as workdir:
        measure.print_header()
        for name, mod in (("1", bench_stage1), ("2", bench_stage2), ("3", bench_stage3), ("4", bench_stage4)):
            rows[name] = mod.run(wl, workdir)
        triples = None
        if not args.no_triples:
            print("\ntriples: the paper's 20 triples through the call scripts, in one process (--triples) and "
                  "one process per triple (PER_TRIPLE=1)", flush=True)
            triples = bench_triples.run(os.path.join(workdir, "triples"), args.triples_train, args.triples_val)
            triples.append(triples_total(triples))
    total = time.perf_counter() - start
    e2e = {k: sum(r[k] for r in rows.values()) for k in ("ours_s", "published_s", "ours_cpu_s", "published_cpu_s")}
    e2e["ratio"] = e2e["published_s"] / max(e2e["ours_s"], 1e-9)
    naive = all("naive_s" in r for r in rows.values())
    s1 = rows["1"]
    print()
    print("| stage | ours s | published s | published / ours | goal | ours CPU s | published CPU s | "
          "ours peak MB | published peak MB |" + (" naive s | naive / ours |" if naive else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if naive else ""))
    for name, r in rows.items():
        print(f"| {name} | {r['ours_s']:.2f} | {r['published_s']:.2f} | {r['ratio']:.1f}x | {GOALS[name]:g}x "
              f"{'met' if r['ratio'] >= GOALS[name] else 'NOT met'} | {r['ours_cpu_s']:.2f} | "
              f"{r['published_cpu_s']:.2f} | {r['ours_peak_mb']:.0f} | {r['published_peak_mb']:.0f} |"
              + (f" {r['naive_s']:.2f} | {r['naive_ratio']:.1f}x |" if naive else ""))
    goal = GOALS["end to end"]
    print(f"| end to end | {e2e['ours_s']:.2f} | {e2e['published_s']:.2f} | {e2e['ratio']:.1f}x | {goal:g}x "
          f"{'met' if e2e['ratio'] >= goal else 'NOT met'} | {e2e['ours_cpu_s']:.2f} | {e2e['published_cpu_s']:.2f} "
          f"| | |" + (" | |" if naive else ""))
    if triples is not None:
        for t in triples:
            print(f"| triples, {t['what']} | {t['batched_s']:.2f} | {t['per_triple_s']:.2f} (one process per triple) "
                  f"| {t['ratio']:.1f}x | {GOAL_TRIPLES:g}x {'met' if t['ratio'] >= GOAL_TRIPLES else 'NOT met'} "
                  f"| | | | |" + (" | |" if naive else ""))
        print(f"(triples: {triples[0]['triples']} triples, 24 classes x {args.triples_train} train / "
              f"{args.triples_val} val generated JPEGs, ResNet-50 random weights; the output folders of the two "
              f"sides are " + ("byte-identical" if not any(t["files_differing"] for t in triples) else "NOT identical")
              + ")")
    print("(goals: the issue's, for the 600-train / 100-val case at 224 px)")
    fv = None if args.no_fv else feature_vis_row(args.fv_steps, args.fv_crops)
    if fv is not None:
        print(f"| fv | {fv['ours_s']:.2f} | {fv['separate_s']:.2f} (separate runs) | {fv['ratio']:.1f}x | | | | | |")
        print(f"(fv: {fv['model']} {fv['layer']}, S = {fv['size']}, {fv['steps']} steps x {fv['crops']} crops of 3 "
              f"targets: ours {fv['ours_s_per_step']:.3f} s/step, {fv['ours_s_per_vis']:.2f} s/visualization; "
              f"3 separate full-network runs {fv['separate_s_per_step']:.3f} s/step)")
    print(f"\nstore bytes per image: ours {s1['store_bytes_per_image_ours']:.0f} (memory-mappable .npy arrays), "
          f"published {s1['store_bytes_per_image_published']:.0f} ({s1['store_files_per_image_published']:.0f} "
          f".pt files per image at batch {wl.batch_size})")
    print("checks against the published algorithm:")
    pc = [rows[k]["published_check"] for k in "1234"]
    print(f"  stage 1: max relative attribution difference {pc[0]['max_rel_diff']:.2g}, same labels "
          f"{pc[0]['same_targets']}, same predictions {pc[0]['same_predictions']}, importance decisions flipped "
          f"{pc[0]['importance_flips']}")
    print(f"  stage 2: candidates ours {pc[1]['candidates_ours']}, published {pc[1]['candidates_other']} "
          f"({pc[1]['published_pairs_before_window']} before its cosine window, "
          f"{pc[1]['published_nan_before_window']} of them NaN/inf from its float16 cosine), in both "
          f"{pc[1]['candidates_common']}, max |cos difference| {pc[1]['max_cos_diff']:.2g}; its float16 ARVs vs "
          f"ours: max relative difference {pc[1]['arv_max_rel_diff']:.2g} ({pc[1]['arv_norms_over_256']} of "
          f"{pc[1]['arvs']} with norm > 256); their cosines in float64 vs ours: max difference "
          f"{pc[1]['max_cos_diff_float64']:.2g}")
    print(f"  stage 3: best rho ours {rows['3']['ours']['best_rho']}, published {rows['3']['published']['best_rho']}, "
          f"max relative score difference {pc[2]['max_rel_score_diff']:.2g}")
    print(f"  stage 4: max relative difference {pc[3]['max_rel_diff']:.2g}")
    cpu1 = os.times()
    print(f"total {total:.0f} s (CPU time of all processes {cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system:.0f} s; "
          f"load average now {os.getloadavg()[0]:.1f})")
    if args.json:
        out = {"workload": wl.describe(), "config": dataclasses.asdict(wl), "torch": torch.__version__,
               "cpus": os.cpu_count(), "total_s": total, "end_to_end": e2e, "goals": GOALS,
               "store_bytes_per_image_ours": s1["store_bytes_per_image_ours"],
               "store_bytes_per_image_published": s1["store_bytes_per_image_published"],
               "stages": {name: {k: v for k, v in r.items() if k not in ("ours", "published", "naive", "stage")}
                          for name, r in rows.items()}}
        if fv is not None:
            out["stages"]["fv"] = fv
        if triples is not None:
            out["triples"] = triples
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


def triples_total(rows):
    """Stages 3 and 4 of bench_triples' rows together."""
    b, p = sum(r["batched_s"] for r in rows), sum(r["per_triple_s"] for r in rows)
    return {"what": "stages 3 + 4", "triples": rows[0]["triples"], "batched_s": b, "per_triple_s": p,
            "ratio": p / b, "files": sum(r["files"] for r in rows),
            "files_differing": [f for r in rows for f in r["files_differing"]]}


def feature_vis_row(steps, crops):
    """bench_featurevis on the workload's architecture (ResNet-50, random weights) and layer, S = 224."""
    (name, model, layer), = [w for w in bench_featurevis.workloads(["resnet50"]) if w[2] == workload.LAYER]
    return bench_featurevis.bench(name, model, layer, 224, steps, crops)


if __name__ == "__main__":
    main()
