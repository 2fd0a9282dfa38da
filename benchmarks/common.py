"""Shared workload and measurement for the stage benchmarks (not part of the test suite).

Workload: torchvision's ResNet-50 structure with random weights (seed 0), the paper's layer
layer4.2.conv3 (2048 x 512 x 1 x 1), images resized to 128 and center-cropped to 112 (a quarter of the
paper's pixels, so that it runs on a CPU), generated JPEGs of 4 classes.

Every implementation runs in a fresh child process (``python bench_stageN.py --child IMPL WORKDIR``):
its wall time covers the stage's work only (not the imports and model construction, which both sides
share), and its peak memory is the child's VmHWM from /proc/self/status: the high-water mark of its
whole resident set, i.e. including about 0.4 GB for the Python interpreter, torch and the model
(reported apart as ``base``), and any file pages mapped into the process.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CLASSES = 4
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 4
BATCH_SIZE = 16
RESIZE, CROP = 128, 112
LAYER = "layer4.2.conv3"
WORKLOAD = (f"ResNet-50 (torchvision structure, random weights), layer {LAYER} 2048x512x1x1, "
            f"{CROP}x{CROP} crops, {CLASSES} classes x {TRAIN_PER_CLASS} train / {VAL_PER_CLASS} val "
            f"generated JPEGs, batch {BATCH_SIZE}, CPU")
# Stage 2: with random weights the attributions are spread thinly over the 2048 channels (no channel
# reaches the paper's tau = 0.03 of an image's positive attribution), so a smaller tau is used; with
# p = 0.75 it gives a few dozen used (channel, class) pairs. The cosine window keeps every pair.
TAU, P_USE, COS_LOW, COS_HIGH = 0.007, 0.75, -1.0, 1.0


def status_kb(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def build_model():
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, model.get_submodule(LAYER)


def transform():
    from torchvision import transforms

    from utils import data
    return transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
                               transforms.Normalize(data.MEAN, data.STD)])


def dataset(workdir, split):
    from utils import data
    return data.image_folder(os.path.join(workdir, "data"), split, transform=transform())


def make_images(workdir, seed=0):
    """ImageFolder of smooth, class-tinted JPEGs (160 x 136) with some noise, once per workdir."""
    root = os.path.join(workdir, "data")
    if os.path.isdir(root):
        return root
    from PIL import Image
    rng = np.random.default_rng(seed)
    tmp = root + ".tmp"
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = os.path.join(tmp, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            tint = rng.random(3)
            for i in range(n):
                yy, xx = np.mgrid[0:136, 0:160] / 160.0
                phase = rng.random(3) * 6
                img = 0.35 + 0.25 * np.sin((3 + c) * xx[..., None] + 2 * yy[..., None] + phase) + 0.3 * tint
                img = img + rng.normal(0, 0.05, img.shape)
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    os.path.join(d, f"img{i:03d}.jpg"), quality=90)
    os.replace(tmp, root)
    return root


def folder_bytes(folder):
    total, files = 0, 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
            files += 1
    return total, files


# ------------------------------------------------------------------ child side

def child_run(fn, workdir):
    """Run ``fn(workdir, timer) -> dict`` (``with timer:`` around the measured part); print one JSON line
    with the result, the measured seconds and the memory."""
    import torch
    torch.manual_seed(0)
    timer = Timer()
    result = fn(workdir, timer) or {}
    st = status_kb("VmHWM", "VmRSS")
    print(json.dumps(dict(result, seconds=timer.seconds, all_seconds=timer.times, peak_mb=st["VmHWM"] / 1024,
                          base_mb=timer.base_kb / 1024)), flush=True)


REPEAT = 2  # the measured part runs this many times in its process; the fastest run counts


class Timer:
    """Times the measured part: ``for _ in timer.runs(): with timer: ...``.

    ``seconds``: the fastest of the REPEAT runs (the first also pays for one-off costs such as oneDNN's
    kernel setup, which a pass over a real data set amortizes; on a shared machine the minimum is also the
    least disturbed run). Naive runs made of dozens of passes, where those costs are already amortized,
    run once (``timer.runs(1)``). ``base_kb``: the resident set just before the first run.
    """

    def __init__(self):
        self.times, self.base_kb = [], None

    def runs(self, n=REPEAT):
        return range(n)

    @property
    def seconds(self):
        return min(self.times)

    def __enter__(self):
        if self.base_kb is None:
            self.base_kb = status_kb("VmRSS")["VmRSS"]
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self.t)
        return False


def child_main(impls):
    """``impls``: {name: fn(workdir, timer) -> dict}. Handles ``--child NAME WORKDIR``; returns False otherwise."""
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_run(impls[sys.argv[2]], sys.argv[3])
        return True
    return False


# ------------------------------------------------------------------ parent side

def run_child(script, impl, workdir):
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--child", impl, workdir], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{os.path.basename(script)} {impl} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])


def compare(stage, script, workdir, what, extra=None):
    """Run ``ours`` then ``naive`` in fresh processes; print and return the stage's row.

    ``extra(ours, naive) -> dict`` adds fields; ``what`` is formatted with the row's fields."""
    ours = run_child(script, "ours", workdir)
    naive = run_child(script, "naive", workdir)
    row = {"stage": stage, "what": what, "ours_s": ours["seconds"], "naive_s": naive["seconds"],
           "ratio": naive["seconds"] / max(ours["seconds"], 1e-9),
           "ours_peak_mb": ours["peak_mb"], "naive_peak_mb": naive["peak_mb"],
           "ours_base_mb": ours["base_mb"], "naive_base_mb": naive["base_mb"],
           "ours": ours, "naive": naive}
    if extra:
        row.update(extra(ours, naive))
    row["what"] = what.format(**row)
    print_row(row)
    return row


def print_header():
    print(f"{'stage':<6} {'ours s':>8} {'naive s':>8} {'naive/ours':>10} {'ours peak MB':>13} "
          f"{'naive peak MB':>14}  what")


def print_row(row):
    print(f"{row['stage']:<6} {row['ours_s']:>8.2f} {row['naive_s']:>8.2f} {row['ratio']:>9.1f}x "
          f"{row['ours_peak_mb']:>8.0f} ({row['ours_base_mb']:.0f}) {row['naive_peak_mb']:>8.0f} "
          f"({row['naive_base_mb']:.0f})  {row['what']}", flush=True)


@contextlib.contextmanager
def workdir_from(path=None):
    """``path`` (created, kept) or a temporary folder removed at the end; generated images inside."""
    if path:
        os.makedirs(path, exist_ok=True)
        make_images(path)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="bench_")
    try:
        make_images(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def standalone(stage_fn, doc):
    """``python bench_stageN.py [--workdir W]``: run one stage's benchmark on its own."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="keep the generated images and stage-1 outputs here (default: a temporary folder)")
    args = p.parse_args()
    with workdir_from(args.workdir) as workdir:
        print(f"workload: {WORKLOAD}")
        print_header()
        stage_fn(workdir)


def ensure_stage1(workdir):
    """Make both stage-1 outputs (untimed) if a stage benchmark runs before bench_stage1."""
    import bench_stage1
    if not os.path.isfile(os.path.join(bench_stage1.ours_folder(workdir), "manifest.json")):
        run_child(bench_stage1.__file__, "ours", workdir)
    if not os.path.isdir(bench_stage1.naive_folder(workdir)):
        run_child(bench_stage1.__file__, "naive", workdir)


def open_store(workdir):
    import bench_stage1
    folder = bench_stage1.ours_folder(workdir)
    return {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r")
            for name in ("attributions", "targets", "patch_sums")}


def pick_concepts(workdir):
    """Stage 3/4 workload: the channel whose two most frequent classes (by the histogram at TAU) are
    the most frequent overall, and those two classes as concept 1 and concept 2."""
    import torch

    from utils import similarities
    st = open_store(workdir)
    hist = similarities.class_histogram(st["attributions"], st["targets"], CLASSES, TAU)
    top2 = torch.topk(hist, 2, dim=0)
    c = int(torch.argmax(top2.values.sum(dim=0)))
    y1, y2 = sorted(top2.indices[:, c].tolist())
    return c, [y1], [y2]


def concept_arvs(workdir, conv, c, s1, s2):
    """v1, v2: ARVs of channel c for the two concepts, in closed form from the store."""
    from utils import similarities
    st = open_store(workdir)
    targets = np.asarray(st["targets"])
    w = conv.weight[c].detach()
    return [similarities.arv(w, similarities.rows_mean_patch_sums(st["patch_sums"], np.flatnonzero(np.isin(targets, s)))).float()
            for s in (s1, s2)]
