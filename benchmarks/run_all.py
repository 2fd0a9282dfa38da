"""Run the four stage benchmarks (ours against the naive way of doing the same work) and print one table.

  python benchmarks/run_all.py [--json FILE] [--workdir DIR]

Each implementation runs in a fresh child process on the same generated workload (see common.py):
seconds = wall time of the stage's work (imports and model construction excluded, on both sides; the
faster of two runs in the same process, one run for the naive stages 2 and 3 which make dozens of passes);
peak MB = the child's VmHWM (peak resident set, /proc/self/status), which includes the interpreter,
torch and the model: the resident set just before the measured part is shown in parentheses.
--json writes per stage ours_s, naive_s, ratio (naive/ours), ours_peak_mb, naive_peak_mb, and the
store's bytes per image of both (store_bytes_per_image_ours, store_bytes_per_image_naive).
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_stage1  # noqa: E402
import bench_stage2  # noqa: E402
import bench_stage3  # noqa: E402
import bench_stage4  # noqa: E402
import common  # noqa: E402

KEYS = ("ours_s", "naive_s", "ratio", "ours_peak_mb", "naive_peak_mb", "ours_base_mb", "naive_base_mb", "what")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--workdir", default=None, help="keep the workload here (default: a temporary folder)")
    args = p.parse_args()
    import torch
    start = time.perf_counter()
    print(f"workload: {common.WORKLOAD}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    rows = {}
    with common.workdir_from(args.workdir) as workdir:
        common.print_header()
        for name, mod in (("1", bench_stage1), ("2", bench_stage2), ("3", bench_stage3), ("4", bench_stage4)):
            rows[name] = mod.run(workdir)
    total = time.perf_counter() - start
    s1 = rows["1"]
    print()
    print("| stage | what | ours s | naive s | naive/ours | ours peak MB | naive peak MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['what']} | {r['ours_s']:.2f} | {r['naive_s']:.2f} | {r['ratio']:.1f}x | "
              f"{r['ours_peak_mb']:.0f} | {r['naive_peak_mb']:.0f} |")
    print(f"\nstore bytes per image: ours {s1['store_bytes_per_image_ours']:.0f} (memory-mappable .npy arrays), "
          f"naive {s1['store_bytes_per_image_naive']:.0f} ({s1['store_files_per_image_naive']:.0f} .pt files per "
          f"image at batch {common.BATCH_SIZE})")
    print(f"total {total:.0f} s")
    if args.json:
        out = {"workload": common.WORKLOAD, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "total_s": total,
               "store_bytes_per_image_ours": s1["store_bytes_per_image_ours"],
               "store_bytes_per_image_naive": s1["store_bytes_per_image_naive"],
               "stages": {name: {k: v for k, v in r.items() if k not in ("ours", "naive", "stage")}
                          for name, r in rows.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
