"""Shared workload and measurement for the stage benchmarks (not part of the test suite).

Workload: torchvision's ResNet-50 structure with random weights (seed 0), the paper's layer
layer4.2.conv3 (2048 x 512 x 1 x 1), generated JPEGs. By default 4 classes x 8 train / 4 val images
resized to 128 and center-cropped to 112 (a quarter of the paper's pixels, so that it runs in minutes on
a CPU); ``--classes``, ``--train_per_class``, ``--val_per_class``, ``--resize``, ``--crop`` change it (the
issue's 600-train / 100-val case: ``--classes 6 --train_per_class 100 --val_per_class 17 --resize 256
--crop 224``). Batch 64 (``--batch_size``), the default of both code bases.

Three implementations of each stage:
  ours       the functions the stage scripts call;
  published  the published script's algorithm as it is (docs/published_code.md), run on the CPU;
  naive      an older, simpler baseline doing the same computation (kept as an extra row).

Every implementation runs in a fresh child process (``python bench_stageN.py --child IMPL WORKDIR``)
with the same torch thread count (``--threads``, default os.cpu_count()): its wall time covers the
stage's work only (not the imports and the construction of the base model, which both sides share);
its CPU time (user + system of its threads, not of DataLoader worker processes) is reported beside it,
which a loaded machine disturbs less than the wall time; its peak memory is the child's VmHWM from
/proc/self/status: the high-water mark of its whole resident set, i.e. including about 0.4 GB for the
Python interpreter, torch and the model (reported apart as ``base``), and any file pages mapped into
the process (worker processes are not counted). The workload's settings live in WORKDIR/config.json,
written by the parent.
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
from utils.data import classmap  # noqa: E402

LAYER = "layer4.2.conv3"
# Stage 2: with random weights the attributions are spread thinly over the 2048 channels (no channel
# reaches the paper's tau = 0.03 of an image's positive attribution), so a smaller tau is used; with
# p = 0.75 it gives a few dozen used (channel, class) pairs. The cosine window keeps every pair.
P_USE, COS_LOW, COS_HIGH = 0.75, -1.0, 1.0
PUBLISHED_WORKERS = 8       # the published scripts' DataLoader workers in stages 1 and 2 (hard-coded)
PUBLISHED_BATCH_CONCEPT2 = 128  # the published stage 3's batch size for concept 2 (hard-coded)
PUBLISHED_BATCH_STAGE4 = 64     # the published stage 4's batch size (hard-coded)

DEFAULTS = dict(classes=4, train_per_class=8, val_per_class=4, batch_size=64, resize=128, crop=112,
                threads=None, workers=None, tau=0.007, repeat=2, naive=True)
CONFIG = {}


def configure(**kw):
    """Set the workload (module globals CLASSES, TRAIN_PER_CLASS, ... used by the stage benchmarks)."""
    global CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH_SIZE, RESIZE, CROP, THREADS, WORKERS, TAU, REPEAT
    global WORKLOAD
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in kw.items() if v is not None})
    if cfg["threads"] is None:
        cfg["threads"] = os.cpu_count() or 1
    CONFIG.clear()
    CONFIG.update(cfg)
    CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = cfg["classes"], cfg["train_per_class"], cfg["val_per_class"]
    BATCH_SIZE, RESIZE, CROP = cfg["batch_size"], cfg["resize"], cfg["crop"]
    THREADS, WORKERS, TAU, REPEAT = cfg["threads"], cfg["workers"], cfg["tau"], cfg["repeat"]
    workers = ("each side's default (ours min(8, CPUs), published 8 in stages 1-2 and 0 in stages 3-4)"
               if WORKERS is None else f"{WORKERS} loader workers")
    WORKLOAD = (f"ResNet-50 (torchvision structure, random weights), layer {LAYER} 2048x512x1x1, "
                f"{CROP}x{CROP} crops of {RESIZE}, {CLASSES} classes x {TRAIN_PER_CLASS} train / {VAL_PER_CLASS} val "
                f"generated JPEGs ({CLASSES * TRAIN_PER_CLASS} / {CLASSES * VAL_PER_CLASS}), batch {BATCH_SIZE}, "
                f"CPU, {THREADS} torch threads on both sides, {workers}, stage-2 tau {TAU}, "
                f"fastest of {REPEAT} run(s)")
    return cfg


configure()


def workload_key():
    """Sub-folder name of a workload: what changes the generated files."""
    return (f"c{CLASSES}_t{TRAIN_PER_CLASS}_v{VAL_PER_CLASS}_r{RESIZE}_k{CROP}_b{BATCH_SIZE}")


def add_workload_args(p):
    g = p.add_argument_group("workload (both sides get the same)")
    g.add_argument("--classes", type=int, default=DEFAULTS["classes"], help="class folders (default %(default)s)")
    g.add_argument("--train_per_class", type=int, default=DEFAULTS["train_per_class"],
                   help="train images per class (default %(default)s)")
    g.add_argument("--val_per_class", type=int, default=DEFAULTS["val_per_class"],
                   help="val images per class (default %(default)s)")
    g.add_argument("--resize", type=int, default=DEFAULTS["resize"],
                   help="shorter side after resizing (default %(default)s; the paper's 256)")
    g.add_argument("--crop", type=int, default=DEFAULTS["crop"],
                   help="center crop (default %(default)s; the paper's 224)")
    g.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"],
                   help="batch size of both sides (default %(default)s, the default of both code bases)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads, set in every child (default: os.cpu_count())")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of every implementation (default: each side's own default)")
    g.add_argument("--tau", type=float, default=DEFAULTS["tau"],
                   help="stage-2 tau (default %(default)s: random weights spread attribution thinly)")
    g.add_argument("--repeat", type=int, default=DEFAULTS["repeat"],
                   help="runs of each measured part in its process, the fastest counts (default %(default)s)")
    g.add_argument("--no_naive", dest="naive", action="store_false",
                   help="skip the extra naive rows (they make dozens of passes: slow at full size)")
    return p


def configure_from_args(args):
    return configure(**{k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)})


def load_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return configure(**json.load(f))


def save_config(workdir):
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=1)


def workers_ours():
    from utils.run import cli
    return cli.default_workers(WORKERS)


def workers_published(default):
    return default if WORKERS is None else WORKERS


def status_kb(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def build_model(requires_grad=False):
    """ResNet-50 with random weights (seed 0). ``requires_grad=True``: the parameters in their default
    state, as the published scripts leave them (their forward passes then record the whole graph)."""
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for prm in model.parameters():
        prm.requires_grad_(requires_grad)
    return model, model.get_submodule(LAYER)


def transform():
    from torchvision import transforms

    from utils.data import folders
    return transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
                               transforms.Normalize(folders.MEAN, folders.STD)])


def data_root(workdir):
    return os.path.join(workdir, "data")


def dataset(workdir, split):
    from utils.data import folders
    return folders.image_folder(data_root(workdir), split, transform=transform())


def image_size():
    """(width, height) of the generated JPEGs: a little larger than the resize, 5:4 like many photos
    (160 x 136 for the default resize of 128)."""
    return round(RESIZE * 1.25), round(RESIZE * 1.0625)


def make_images(workdir, seed=0):
    """ImageFolder of smooth, class-tinted JPEGs with some noise, once per workdir."""
    root = data_root(workdir)
    if os.path.isdir(root):
        return root
    from PIL import Image
    rng = np.random.default_rng(seed)
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    width, height = image_size()
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = os.path.join(tmp, split, classmap.imagenet_wnids()[c])
            os.makedirs(d, exist_ok=True)
            tint = rng.random(3)
            for i in range(n):
                yy, xx = np.mgrid[0:height, 0:width] / width
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
    """Run ``fn(workdir, timer) -> dict`` (``with timer:`` around the measured part) with the workload's
    thread count; print one JSON line with the result, the measured seconds and the memory."""
    import torch
    load_config(workdir)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    timer = Timer()
    result = fn(workdir, timer) or {}
    st = status_kb("VmHWM", "VmRSS")
    print(json.dumps(dict(result, seconds=timer.seconds, all_seconds=timer.times, cpu_seconds=timer.cpu_seconds,
                          peak_mb=st["VmHWM"] / 1024,
                          base_mb=timer.base_kb / 1024, threads=torch.get_num_threads())), flush=True)


class Timer:
    """Times the measured part: ``for _ in timer.runs(): with timer: ...``.

    ``seconds``: the fastest of the REPEAT runs (``--repeat``; the first also pays for one-off costs such as
    oneDNN's kernel setup, which a pass over a real data set amortizes; on a shared machine the minimum is
    also the least disturbed run). Ours and published run the same number of times; the naive stages 2 and
    3, made of dozens of passes where those costs are already amortized, run once (``timer.runs(1)``).
    ``base_kb``: the resident set just before the first run.
    """

    def __init__(self):
        self.times, self.cpu_times, self.base_kb = [], [], None

    def runs(self, n=None):
        return range(REPEAT if n is None else n)

    @property
    def seconds(self):
        return min(self.times)

    @property
    def cpu_seconds(self):
        """CPU time (user + system, all threads of this process) of the fastest run."""
        return self.cpu_times[self.times.index(min(self.times))]

    def __enter__(self):
        if self.base_kb is None:
            self.base_kb = status_kb("VmRSS")["VmRSS"]
        self.t, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self.t)
        self.cpu_times.append(time.process_time() - self.cpu)
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


def compare(stage, script, workdir, what, check=None):
    """Run ``ours``, ``published`` and (unless --no_naive) ``naive`` in fresh processes; print and return
    the stage's row.

    ``check(ours, other) -> dict`` compares another implementation's numbers with ours (added to the row
    as ``published_check`` and ``naive_check``); ``what`` is formatted with the row's fields."""
    ours = run_child(script, "ours", workdir)
    pub = run_child(script, "published", workdir)
    naive = run_child(script, "naive", workdir) if CONFIG["naive"] else None
    row = {"stage": stage, "ours_s": ours["seconds"], "published_s": pub["seconds"],
           "ratio": pub["seconds"] / max(ours["seconds"], 1e-9),
           "ours_peak_mb": ours["peak_mb"], "published_peak_mb": pub["peak_mb"],
           "ours_base_mb": ours["base_mb"], "published_base_mb": pub["base_mb"],
           "ours_cpu_s": ours["cpu_seconds"], "published_cpu_s": pub["cpu_seconds"],
           "ours": ours, "published": pub}
    if naive is not None:
        row.update({"naive_s": naive["seconds"], "naive_ratio": naive["seconds"] / max(ours["seconds"], 1e-9),
                    "naive_peak_mb": naive["peak_mb"], "naive_base_mb": naive["base_mb"], "naive": naive})
    if check:
        row["published_check"] = check(ours, pub)
        if naive is not None:
            row["naive_check"] = check(ours, naive)
    row["what"] = what.format(**row)
    print_row(row)
    return row


def print_header():
    print(f"{'stage':<6} {'ours s':>8} {'publ. s':>8} {'publ./ours':>10} {'ours peak MB':>13} "
          f"{'publ. peak MB':>14}  {'naive s':>8} {'naive/ours':>10} {'naive peak MB':>14}")


def print_row(row):
    naive = (f"{row['naive_s']:>8.2f} {row['naive_ratio']:>9.1f}x {row['naive_peak_mb']:>8.0f} "
             f"({row['naive_base_mb']:.0f})" if "naive_s" in row else f"{'-':>8} {'-':>10} {'-':>14}")
    print(f"{row['stage']:<6} {row['ours_s']:>8.2f} {row['published_s']:>8.2f} {row['ratio']:>9.1f}x "
          f"{row['ours_peak_mb']:>8.0f} ({row['ours_base_mb']:.0f}) {row['published_peak_mb']:>8.0f} "
          f"({row['published_base_mb']:.0f})  {naive}", flush=True)
    print(f"       {row['what']}", flush=True)
    print(f"       CPU seconds of the measured part (this process's threads; loader workers not counted): ours "
          f"{row['ours_cpu_s']:.2f}, published {row['published_cpu_s']:.2f}", flush=True)


@contextlib.contextmanager
def workdir_from(path=None):
    """The workload's own sub-folder (generated images inside, config.json written) of ``path``
    (created, kept) or of a temporary folder removed at the end."""
    tmp = None if path else tempfile.mkdtemp(prefix="bench_")
    try:
        sub = os.path.join(path or tmp, workload_key())
        os.makedirs(sub, exist_ok=True)
        make_images(sub)
        save_config(sub)
        yield sub
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def standalone(stage_fn, doc):
    """``python bench_stageN.py [--workdir W] [workload flags]``: run one stage's benchmark on its own."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="keep the generated images and stage outputs here (default: a temporary folder)")
    add_workload_args(p)
    args = p.parse_args()
    configure_from_args(args)
    with workdir_from(args.workdir) as workdir:
        print(f"workload: {WORKLOAD}")
        print_header()
        stage_fn(workdir)


def ensure_stage1(workdir):
    """Make the stage-1 outputs (untimed) that a later stage reads if bench_stage1 has not run."""
    import bench_stage1
    if not os.path.isfile(os.path.join(bench_stage1.ours_folder(workdir), "manifest.json")):
        run_child(bench_stage1.__file__, "ours", workdir)
    if not os.path.isfile(bench_stage1.published_done(workdir)):
        run_child(bench_stage1.__file__, "published", workdir)
    if CONFIG["naive"] and not os.path.isdir(bench_stage1.naive_folder(workdir)):
        run_child(bench_stage1.__file__, "naive", workdir)


def ensure_published_stage2(workdir):
    """The published stage 2's ARV pickle (untimed), which the published stage 3 reads."""
    import bench_stage2
    ensure_stage1(workdir)
    if not os.path.isfile(bench_stage2.published_arv_pickle(workdir)):
        run_child(bench_stage2.__file__, "published", workdir)


def open_store(workdir):
    import bench_stage1
    folder = bench_stage1.ours_folder(workdir)
    return {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r")
            for name in ("attributions", "targets", "patch_sums")}


def pick_concepts(workdir):
    """Stage 3/4 workload, from our store at TAU and P_USE: among the channels used by at least two
    classes (those whose ARVs the published stage 2 computes), the one whose two most frequent used
    classes are the most frequent overall, and those two classes as concept 1 and concept 2. Without such
    a channel: the same rule over all channels and classes."""
    import torch

    from utils.method import similarities
    from utils.stages import passes
    st = open_store(workdir)
    hist = passes.class_histogram(st["attributions"], st["targets"], CLASSES, TAU).double()
    used = similarities.used_classes(hist, similarities.class_counts(st["targets"], CLASSES), P_USE)
    masked = torch.where(used, hist, torch.full_like(hist, -1.0))
    if (used.sum(dim=0) >= 2).any():
        hist = masked
        hist[:, used.sum(dim=0) < 2] = -1.0
    top2 = torch.topk(hist, 2, dim=0)
    c = int(torch.argmax(top2.values.sum(dim=0)))
    y1, y2 = sorted(top2.indices[:, c].tolist())
    return c, [y1], [y2]


def concept_arvs(workdir, conv, c, s1, s2):
    """v1, v2: ARVs of channel c for the two concepts, in closed form from the store."""
    from utils.method import similarities
    st = open_store(workdir)
    targets = np.asarray(st["targets"])
    w = conv.weight[c].detach()
    return [similarities.arv(w, similarities.rows_mean_patch_sums(st["patch_sums"], np.flatnonzero(np.isin(targets, s)))).float()
            for s in (s1, s2)]


# ------------------------------------------------------------------ the published scripts' helpers

def published_class_counts(split_dir):
    """Images per class folder, by listing each folder (as the published scripts count them)."""
    counts = []
    for _, dirs, _ in os.walk(split_dir):  # walks the class folders too, as published (they have no sub-folders)
        for d in sorted(dirs):
            counts.append(len(os.listdir(os.path.join(split_dir, d))))
    return counts


def published_subset(split_dir, classes):
    """The published way to get a class's images: a fresh ImageFolder over the whole split (every file
    listed again), then a Subset of the class's index range from the per-folder counts."""
    import torch
    from torchvision import datasets
    counts = published_class_counts(split_dir)
    ds = datasets.ImageFolder(split_dir, transform())
    keep = []
    for y in classes:
        keep += range(sum(counts[:y]), sum(counts[:y + 1]))
    return torch.utils.data.Subset(ds, keep)


def published_hooks(module, want_input=False, want_output=False, want_grad=False, store=None):
    """Register the published scripts' hooks on ``module``: forward hooks keeping the (detached) input
    and output, and the deprecated module backward hook keeping the gradient at the output."""
    import warnings
    store = {} if store is None else store
    handles = []
    if want_input:
        handles.append(module.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach())))
    if want_output:
        handles.append(module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach())))
    if want_grad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handles.append(module.register_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0].detach())))
    return store, handles
