r"""Peak memory of stage 2 on a store of ImageNet's shape (1,281,167 images x 2048 channels).

Writes a synthetic store like stage 1's (attributions N x 2048 float16 = 5.2 GB, patch_sums
N x 512 x 1 x 1 float32 = 2.6 GB, targets N int64) into a temporary folder, then runs stage 2 as
get_cosine_similarities.py does (chunked class histograms, used classes, chunked class means of the
patch sums, candidate pairs) in a fresh child process, and reports its memory:

  RssAnon peak   anonymous resident memory (what the computation itself holds), sampled every 10 ms
                 from /proc/self/status; the baseline after `import torch` is shown apart
  VmHWM          the kernel's high-water mark of the whole resident set (anonymous + file-backed pages
                 mapped into the process): what `top` or a job scheduler would see
  RssFile peak   file-backed resident pages (memory-mapped store pages show up here)

Two ways of reading the chunks are measured: 'read' (utils.files.rows.read_rows: positional file
reads of each chunk, what stage 2 does) and 'mmap' (slicing the memory maps, which leaves every page
read mapped into the process until the kernel reclaims it). The folder is removed at the end.

  python -m benchmarks.studies.stage2_memory [--rows 1281167] [--dir /big/tmp] [--json out.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.measure import ROOT, status_kb


class Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile, sampled from /proc/self/status."""

    def __init__(self, interval=0.01):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak = interval, threading.Event(), {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.stop.is_set():
            s = status_kb("RssAnon", "RssFile")
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(self.interval)


def make_store(folder, n, c_out, c_in, k, seed=0):
    """Synthetic stage-1 arrays: each class has a few channels with large positive attributions
    (so channels use classes and candidate pairs exist), the rest is noise; class-dependent patch sums."""
    rng = np.random.default_rng(seed)
    per = np.full(k, n // k)
    per[: n % k] += 1
    targets = np.repeat(np.arange(k), per)
    np.save(os.path.join(folder, "targets.npy"), targets)
    A = np.lib.format.open_memmap(os.path.join(folder, "attributions.npy"), "w+", np.float16, (n, c_out))
    P = np.lib.format.open_memmap(os.path.join(folder, "patch_sums.npy"), "w+", np.float32, (n, c_in, 1, 1))
    pool = rng.standard_normal((8192, c_out), dtype=np.float32).astype(np.float16) * np.float16(0.1)
    pool_p = np.abs(rng.standard_normal((8192, c_in), dtype=np.float32))
    hot = rng.integers(0, c_out, size=(k, 3))
    class_p = (rng.random((k, c_in)) < 0.05).astype(np.float32) * 20  # a few strong inputs per class
    lo = 0
    for y in range(k):
        hi = lo + per[y]
        start = int(rng.integers(0, len(pool) - per[y]))
        block = pool[start:start + per[y]].copy()
        block[:, hot[y]] += np.float16(20.0)
        A[lo:hi] = block
        P[lo:hi, :, 0, 0] = pool_p[start:start + per[y]] + class_p[y]
        lo = hi
    A.flush()
    P.flush()
    del A, P
    W = rng.standard_normal((c_out, c_in, 1, 1), dtype=np.float32)
    np.save(os.path.join(folder, "weight.npy"), W)


def warm_page_cache(folder, block=1 << 26):
    """Read every file of ``folder`` once (into a reused buffer), so that no mode pays for the disk alone."""
    buf = bytearray(block)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def child(folder, mode, chunk_rows):
    """Stage 2 on the store in ``folder``; prints one JSON line with timings and memory."""
    import resource

    import torch

    from utils.method import similarities
    from utils.stages import stage2_passes
    torch.set_num_threads(1)
    base = status_kb("RssAnon", "RssFile", "VmRSS")
    A = np.load(os.path.join(folder, "attributions.npy"), mmap_mode="r")
    targets = np.load(os.path.join(folder, "targets.npy"), mmap_mode="r")
    P = np.load(os.path.join(folder, "patch_sums.npy"), mmap_mode="r")
    W = torch.from_numpy(np.load(os.path.join(folder, "weight.npy")))
    if mode == "mmap":  # slices of the maps: read_rows then falls back to slicing the mapping
        A, targets, P = A[:], targets[:], P[:]
    k = int(targets[-1]) + 1
    sampler = Sampler()
    sampler.start()
    times = {}
    t = time.perf_counter()
    hist = stage2_passes.class_histogram(A, targets, k, 0.03, chunk_rows)
    times["histogram_s"] = time.perf_counter() - t
    counts = similarities.class_counts(targets, k)
    used = similarities.used_classes(hist, counts, 0.75)
    t = time.perf_counter()
    means = stage2_passes.class_mean_patch_sums(P, targets, k, chunk_rows)
    times["class_means_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cands = similarities.candidate_pairs(W, means, used, 0.0, 0.5)
    times["candidates_s"] = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    end = status_kb("VmHWM", "RssAnon", "RssFile")
    print(json.dumps(dict(
        mode=mode, chunk_rows=chunk_rows, rows=int(A.shape[0]), channels=int(A.shape[1]),
        used_pairs=int(used.sum()), candidates=len(cands), **times,
        baseline_rss_anon_mb=base["RssAnon"] / 1024,
        peak_rss_anon_mb=max(sampler.peak["RssAnon"], end["RssAnon"]) / 1024,
        peak_rss_file_mb=max(sampler.peak["RssFile"], end["RssFile"]) / 1024,
        vm_hwm_mb=end["VmHWM"] / 1024,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1281167, help="images (default: ImageNet train, 1281167)")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--in_channels", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--chunk_rows", type=int, default=None, help="default: utils.method.similarities.DEFAULT_CHUNK_ROWS")
    p.add_argument("--modes", default="read,mmap", help="comma-separated: read, mmap")
    p.add_argument("--dir", default=None, help="parent folder of the temporary store (needs ~8 GB)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=3, metavar=("FOLDER", "MODE", "CHUNK_ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))

    from utils.method import similarities
    chunk_rows = args.chunk_rows or similarities.DEFAULT_CHUNK_ROWS
    folder = tempfile.mkdtemp(prefix="stage2_memory_", dir=args.dir)
    results = []
    try:
        t = time.perf_counter()
        make_store(folder, args.rows, args.channels, args.in_channels, args.classes)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"synthetic store: {args.rows} images x {args.channels} channels, {args.in_channels} input "
              f"channels, {args.classes} classes; {size / 1e9:.2f} GB on disk in {folder} "
              f"(written in {time.perf_counter() - t:.0f} s)", flush=True)
        for mode in args.modes.split(","):
            warm_page_cache(folder)  # both modes start with the store in the page cache, as far as RAM allows
            proc = subprocess.run([sys.executable, "-m", "benchmarks.studies.stage2_memory", "--child", folder, mode, str(chunk_rows)],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"child failed:\n{proc.stdout}\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["store_gb"] = size / 1e9
            results.append(r)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nstage 2 (histograms, class means, candidates), chunks of {chunk_rows} rows, one thread:")
    head = f"{'reads':<6} {'RssAnon peak':>13} {'(base)':>8} {'VmHWM':>9} {'RssFile peak':>13} " \
           f"{'hist s':>7} {'means s':>8} {'cands s':>8} {'cands':>7}"
    print(head)
    for r in results:
        print(f"{r['mode']:<6} {r['peak_rss_anon_mb']:>10.0f} MB {r['baseline_rss_anon_mb']:>5.0f} MB "
              f"{r['vm_hwm_mb']:>6.0f} MB {r['peak_rss_file_mb']:>10.0f} MB {r['histogram_s']:>7.1f} "
              f"{r['class_means_s']:>8.1f} {r['candidates_s']:>8.1f} {r['candidates']:>7}")
    print("RssAnon: anonymous memory (sampled every 10 ms); base: after importing torch and numpy; "
          "VmHWM: peak of all resident memory incl. mapped file pages")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
