"""Stages 3 and 4 for the paper's 20 triples: one process with --triples against one process per triple.

Both sides run the call scripts as a user would (``bash disentanglement_calls.sh DATA STORE ...`` and
``bash quantitative_evaluation_calls.sh ...``; ``PER_TRIPLE=1`` for one process per triple), so the
seconds are whole wall times: interpreter start, imports, model load, the passes over the images, files.
The two sides' output folders are compared file by file (they must be byte-identical).

Workload: torchvision's ResNet-50 with random weights (seed 0, passed as a state-dict file), the paper's
layer layer4.2.conv3, the paper's 20 triples with their channels and their 24 classes renumbered 0..23
in sorted order, generated JPEGs (--train_per_class, --val_per_class) at the paper's 224 x 224 crops;
stage 1 (untimed) writes the store first. CPU.

  python -m benchmarks.bench_triples [--workdir DIR] [--train_per_class 8] [--val_per_class 4] [--json FILE]
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

from benchmarks.measure import ROOT

TAG = "resnet50"


def make_dataset(root, classes, train, val, seed=0):
    """ImageFolder of smooth, class-tinted, noisy 320 x 272 JPEGs, once per folder."""
    if os.path.isdir(root):
        return root
    from PIL import Image
    rng = np.random.default_rng(seed)
    tmp = root + ".tmp"
    yy, xx = np.mgrid[0:272, 0:320] / 320.0
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = os.path.join(tmp, split, f"class{c:02d}")
            os.makedirs(d, exist_ok=True)
            tint = rng.random(3)
            for i in range(n):
                phase = rng.random(3) * 6
                img = 0.35 + 0.25 * np.sin((3 + c % 7) * xx[..., None] + (1 + c // 7) * yy[..., None] + phase)
                img = img + 0.3 * tint + rng.normal(0, 0.05, img.shape)
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    os.path.join(d, f"img{i:03d}.jpg"), quality=90)
    os.replace(tmp, root)
    return root


def renumbered_triples(path):
    """The paper's triples with their classes renumbered 0..K-1 in sorted order; returns (text, K)."""
    from utils.concepts.by_classes import read_triples
    triples = read_triples(os.path.join(ROOT, "paper_triples.txt"))
    classes = sorted({y for t in triples for y in t.classes})
    new = {y: i for i, y in enumerate(classes)}
    lines = [f"{t.channel} {','.join(str(new[y]) for y in t.classes1)} {','.join(str(new[y]) for y in t.classes2)}"
             for t in triples]
    with open(path, "w") as f:
        f.write("# the paper's 20 triples, classes renumbered 0..23 in sorted order\n" + "\n".join(lines) + "\n")
    return len(triples), len(classes)


def random_weights(path):
    import torch
    import torchvision
    if not os.path.isfile(path):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def timed(cmd, env=None, log=None):
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if log:
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def same_files(a, b):
    """(number of files, names that differ or exist on one side only) of two folders; lock files (which
    name the process that last held them) are left out."""
    def tree(folder):
        out = {}
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".lock"):
                    continue
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, folder)] = f.read()
        return out
    ta, tb = tree(a), tree(b)
    return len(ta), sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))


def run(workdir, train, val):
    data = make_dataset(os.path.join(workdir, f"data_{train}_{val}"), 24, train, val)
    n_triples, n_classes = renumbered_triples(os.path.join(workdir, "triples.txt"))
    weights = random_weights(os.path.join(workdir, "resnet50_random.pth"))
    model = ["--model", "resnet50", "--weights", weights, "--device", "cpu"]
    store = os.path.join(workdir, f"store_{train}_{val}")
    if not os.path.isfile(os.path.join(store, f"{TAG}_channel_importances", "manifest.json")):
        print(f"stage 1 (untimed) on {n_classes * train} train images ...", flush=True)
        timed([sys.executable, "get_importances_for_classes.py", "--data_dir", data, "--store_dir", store, *model,
               "--batch_size", "32"])
    env = {"PYTHON": sys.executable, "TRIPLES": os.path.join(workdir, "triples.txt")}
    rows = []
    stores = {}
    for side in ("batched", "per_triple"):  # each side's stage 3 into a store of its own (same stage-1 arrays)
        stores[side] = os.path.join(workdir, f"run_{side}")
        shutil.rmtree(stores[side], ignore_errors=True)
        os.makedirs(stores[side])
        os.symlink(os.path.join(store, f"{TAG}_channel_importances"),
                   os.path.join(stores[side], f"{TAG}_channel_importances"))
    for stage, script in ((3, "disentanglement_calls.sh"), (4, "quantitative_evaluation_calls.sh")):
        secs = {}
        for side in ("batched", "per_triple"):
            extra = {"PER_TRIPLE": "1"} if side == "per_triple" else {}
            if stage == 4:  # both sides read the batched side's checkpoints, so the summaries name the same files
                extra.update(OUT_DIR=os.path.join(stores[side], "out"))
                folder_args = [data, stores["batched"]]
            else:
                folder_args = [data, stores[side]]
            secs[side] = timed(["bash", os.path.join(ROOT, script), *folder_args, *model], dict(env, **extra),
                               log=os.path.join(workdir, f"stage{stage}_{side}.log"))
        sub = "models_disentangled" if stage == 3 else "out"
        files, differ = same_files(os.path.join(stores["batched"], sub), os.path.join(stores["per_triple"], sub))
        row = {"stage": stage, "what": f"stage {stage}", "triples": n_triples, "batched_s": secs["batched"],
               "per_triple_s": secs["per_triple"], "ratio": secs["per_triple"] / secs["batched"], "files": files,
               "files_differing": differ}
        rows.append(row)
        print(f"stage {stage}: {n_triples} triples in one process {row['batched_s']:7.1f} s, one process per triple "
              f"{row['per_triple_s']:7.1f} s: {row['ratio']:.1f}x; {files} files, "
              + ("byte-identical" if not differ else f"{len(differ)} differ: {differ[:3]}"), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="keep the data, weights and store here (default: a temporary folder)")
    p.add_argument("--train_per_class", type=int, default=8, help="train images per class (default 8)")
    p.add_argument("--val_per_class", type=int, default=4, help="val images per class (default 4)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args()
    import torch
    print(f"workload: ResNet-50 (random weights), layer4.2.conv3, the paper's 20 triples over 24 classes x "
          f"{args.train_per_class} train / {args.val_per_class} val generated JPEGs, 224 x 224 crops, call-script "
          f"defaults (batch 64), CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_triples_")
    os.makedirs(workdir, exist_ok=True)
    try:
        rows = run(workdir, args.train_per_class, args.val_per_class)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
