r"""Time and peak memory of the label-free concepts (get_cosine_similarities.py --label_free) on a store of
ImageNet's shape: 1,281,167 images, ResNet-50's layer4.2.conv3 (2048 x 512 x 1 x 1).

The synthetic store is the one of benchmarks/studies/stage2_memory.py (its ``make_store``: class-dependent patch
sums, N x 512 x 1 x 1 float32 = 2.6 GB, plus the attributions it also writes), in a temporary folder.
Each case runs in a fresh child process with ``--threads`` torch threads (default 2), doing what the
script does after loading the model: ``utils.stages.label_free.discover`` (one chunked pass over the memory-mapped
patch sums for all channels asked for, then per channel the exact top-N, its per-image ARVs and k-means
with k by silhouette over 2..5) and the JSON encoding of the concepts file. Cases:

  one   one channel (channel 0)
  all   all 2048 channels

Reported: wall seconds of the chunked pass, of the per-channel part (ranking, ARVs, clustering), of the JSON
encoding, in all, and CPU seconds (all threads) of the pass, the per-channel part and the whole; peak anonymous memory (RssAnon, sampled every 10 ms; base after the imports shown apart)
and VmHWM (all resident memory, mapped file pages included). The store is read from the page cache
(every file is read once before each case). The folder is removed at the end unless ``--keep``.

  python -m benchmarks.studies.label_free [--rows 1281167] [--cases one,all] [--threads 2] [--dir /big/tmp] [--json out.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.measure import ROOT, status_kb
from benchmarks.studies.stage2_memory import Sampler, make_store, warm_page_cache


def child(folder, case, threads, top_n, chunk_rows):
    """One case on the store in ``folder``; prints one JSON line with timings and memory."""
    import torch

    from utils.method.clustering import Clustering
    from utils.method.similarities import SummedLayer
    from utils.stages import label_free
    torch.set_num_threads(threads)
    base = status_kb("RssAnon", "VmRSS")
    P = np.load(os.path.join(folder, "patch_sums.npy"), mmap_mode="r")
    labels = np.load(os.path.join(folder, "targets.npy"))
    W = torch.from_numpy(np.load(os.path.join(folder, "weight.npy")))
    names = [f"class{y}" for y in range(int(labels.max()) + 1)]
    channels = [0] if case == "one" else list(range(W.shape[0]))
    sampler = Sampler()
    sampler.start()
    times = {}
    from sklearn.cluster import KMeans  # noqa: F401  (imported by the script before it starts; not timed)
    t0, c0 = time.perf_counter(), time.process_time()
    recs = label_free.discover(label_free.TrainingRows(P, labels, names), SummedLayer(W), channels,
                               Clustering(top_n), chunk_rows=chunk_rows, timings=times)
    t = time.perf_counter()
    text = json.dumps({"channels": {str(c): r for c, r in recs.items()}})
    times["json_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    times["total_cpu_s"] = time.process_time() - c0  # CPU seconds of all threads (a busy machine inflates wall s)
    sampler.stop.set()
    sampler.join()
    end = status_kb("VmHWM", "RssAnon")
    ks = np.bincount([r["k"] for r in recs.values()], minlength=6)[2:].tolist()
    print(json.dumps(dict(
        case=case, rows=int(P.shape[0]), channels=len(channels), threads=threads, top_n=top_n, **times,
        json_mb=len(text) / 1e6, k_counts_2to5=ks,
        mean_purity=float(np.mean([r["purity"] for r in recs.values()])),
        baseline_rss_anon_mb=base["RssAnon"] / 1024,
        peak_rss_anon_mb=max(sampler.peak["RssAnon"], end["RssAnon"]) / 1024, vm_hwm_mb=end["VmHWM"] / 1024)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1281167, help="images (default: ImageNet train, 1281167)")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--in_channels", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cases", default="one,all", help="comma-separated: one, all")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each case (default 2)")
    p.add_argument("--top_n", type=int, default=100)
    p.add_argument("--chunk_rows", type=int, default=None, help="default: utils.method.similarities.DEFAULT_CHUNK_ROWS")
    p.add_argument("--dir", default=None, help="parent folder of the temporary store (needs ~8 GB at full size)")
    p.add_argument("--keep", default=None, help="use (or make and keep) the store in this folder")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=5, metavar=("FOLDER", "CASE", "THREADS", "TOP_N", "CHUNK_ROWS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        a = args.child
        return child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]))

    from utils.method import similarities
    chunk_rows = args.chunk_rows or similarities.DEFAULT_CHUNK_ROWS
    folder = args.keep or tempfile.mkdtemp(prefix="label_free_", dir=args.dir)
    results = []
    try:
        if not os.path.isfile(os.path.join(folder, "weight.npy")):
            os.makedirs(folder, exist_ok=True)
            t = time.perf_counter()
            make_store(folder, args.rows, args.channels, args.in_channels, args.classes)
            print(f"synthetic store written in {time.perf_counter() - t:.0f} s", flush=True)
        shape = np.load(os.path.join(folder, "patch_sums.npy"), mmap_mode="r").shape
        print(f"store {folder}: patch sums {shape}, "
              f"{os.path.getsize(os.path.join(folder, 'patch_sums.npy')) / 1e9:.2f} GB", flush=True)
        for case in args.cases.split(","):
            warm_page_cache(folder)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.studies.label_free", "--child", folder, case,
                                   str(args.threads), str(args.top_n), str(chunk_rows)],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"child failed:\n{proc.stdout}\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["load_average_1min_after"] = os.getloadavg()[0]
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nlabel-free concepts, top {args.top_n}, chunks of {chunk_rows} rows, {args.threads} torch threads:")
    print(f"{'case':<5} {'rows':>8} {'channels':>8} {'pass s':>7} {'per-ch s':>9} {'json s':>7} {'total s':>8} "
          f"{'CPU s: pass':>12} {'per-ch':>7} {'total':>7} "
          f"{'RssAnon peak':>13} {'(base)':>8} {'VmHWM':>9} {'JSON':>8}")
    for r in results:
        print(f"{r['case']:<5} {r['rows']:>8} {r['channels']:>8} {r['pass_s']:>7.1f} {r['per_channel_s']:>9.1f} "
              f"{r['json_s']:>7.1f} {r['total_s']:>8.1f} {r['pass_cpu_s']:>12.1f} {r['per_channel_cpu_s']:>7.1f} {r['total_cpu_s']:>7.1f} {r['peak_rss_anon_mb']:>10.0f} MB "
              f"{r['baseline_rss_anon_mb']:>5.0f} MB {r['vm_hwm_mb']:>6.0f} MB {r['json_mb']:>5.0f} MB")
    print("total = pass + per channel + JSON encoding; CPU s: all threads of the process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
