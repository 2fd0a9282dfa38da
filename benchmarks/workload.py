"""The stage benchmarks' workload: one frozen ``Workload`` that the parent process builds from its flags, writes
into the work folder (config.json) and every child process reads back.

Workload: torchvision's ResNet-50 structure with random weights (seed 0), the paper's layer layer4.2.conv3
(2048 x 512 x 1 x 1), generated JPEGs. By default 4 classes x 8 train / 4 val images resized to 128 and
center-cropped to 112 (a quarter of the paper's pixels, so that it runs in minutes on a CPU); ``--classes``,
``--train_per_class``, ``--val_per_class``, ``--resize``, ``--crop`` change it (600 train and 100 val images at the
paper's size: ``--classes 6 --train_per_class 100 --val_per_class 17 --resize 256 --crop 224``). Batch 64
(``--batch_size``), the default of both code bases. ``SMALLEST``: the least work that still goes through every
step (the test suite's smoke run, tests/test_benchmarks.py).
"""
import dataclasses
import json
import os
import shutil

import numpy as np

LAYER = "layer4.2.conv3"
# Stage 2: with random weights the attributions are spread thinly over the 2048 channels (no channel
# reaches the paper's tau = 0.03 of an image's positive attribution), so a smaller tau is used; with
# p = 0.75 it gives a few dozen used (channel, class) pairs. The cosine window keeps every pair.
P_USE, COS_LOW, COS_HIGH = 0.75, -1.0, 1.0
PUBLISHED_WORKERS = 8       # the published scripts' DataLoader workers in stages 1 and 2 (hard-coded)
PUBLISHED_BATCH_CONCEPT2 = 128  # the published stage 3's batch size for concept 2 (hard-coded)
PUBLISHED_BATCH_STAGE4 = 64     # the published stage 4's batch size (hard-coded)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What both sides of a stage benchmark get: the generated data set (classes, images per class, the resize
    and the crop), the batch size, torch's threads in every child (None: os.cpu_count()), the DataLoader workers
    (None: each side's own default), stage 2's tau, how many runs of each measured part (the fastest counts),
    and whether the naive rows run."""
    classes: int = 4
    train_per_class: int = 8
    val_per_class: int = 4
    batch_size: int = 64
    resize: int = 128
    crop: int = 112
    threads: int = None
    workers: int = None
    tau: float = 0.007
    repeat: int = 2
    naive: bool = True

    def __post_init__(self):
        if self.threads is None:
            object.__setattr__(self, "threads", os.cpu_count() or 1)

    @property
    def train_images(self):
        return self.classes * self.train_per_class

    def key(self):
        """Sub-folder name of a workload: what changes the generated files."""
        return (f"c{self.classes}_t{self.train_per_class}_v{self.val_per_class}_r{self.resize}_k{self.crop}"
                f"_b{self.batch_size}")

    def describe(self):
        workers = ("each side's default (ours min(8, CPUs), published 8 in stages 1-2 and 0 in stages 3-4)"
                   if self.workers is None else f"{self.workers} loader workers")
        return (f"ResNet-50 (torchvision structure, random weights), layer {LAYER} 2048x512x1x1, "
                f"{self.crop}x{self.crop} crops of {self.resize}, {self.classes} classes x {self.train_per_class} "
                f"train / {self.val_per_class} val generated JPEGs ({self.train_images} / "
                f"{self.classes * self.val_per_class}), batch {self.batch_size}, CPU, {self.threads} torch threads "
                f"on both sides, {workers}, stage-2 tau {self.tau}, fastest of {self.repeat} run(s)")

    def workers_ours(self):
        from utils.data import folders
        return folders.default_workers(self.workers)

    def workers_published(self, default):
        return default if self.workers is None else self.workers

    def transform(self):
        from torchvision import transforms

        from utils.data import folders
        return transforms.Compose([transforms.Resize(self.resize), transforms.CenterCrop(self.crop),
                                   transforms.ToTensor(), transforms.Normalize(folders.MEAN, folders.STD)])

    def dataset(self, workdir, split):
        from utils.data import folders
        return folders.image_folder(data_root(workdir), split, transform=self.transform())

    def image_size(self):
        """(width, height) of the generated JPEGs: a little larger than the resize, 5:4 like many photos
        (160 x 136 for the default resize of 128)."""
        return round(self.resize * 1.25), round(self.resize * 1.0625)

    def make_images(self, workdir, seed=0):
        """ImageFolder of smooth, class-tinted JPEGs with some noise, once per workdir."""
        from PIL import Image

        from utils.data import classmap
        root = data_root(workdir)
        if os.path.isdir(root):
            return root
        rng = np.random.default_rng(seed)
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        width, height = self.image_size()
        for split, n in (("train", self.train_per_class), ("val", self.val_per_class)):
            for c in range(self.classes):
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

    def save(self, workdir):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, workdir):
        """The workload the parent wrote into ``workdir`` (config.json)."""
        with open(os.path.join(workdir, "config.json")) as f:
            return cls(**json.load(f))

    def flags(self):
        """The command-line flags of this workload (``add_args``'s)."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "naive":
                out += [] if value else ["--no_naive"]
            elif value is not None:
                out += [f"--{f.name}", str(value)]
        return out

    @classmethod
    def from_args(cls, args):
        """From the flags of ``add_args`` (a flag left out or None: the default)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                      if getattr(args, f.name, None) is not None})


DEFAULT = Workload()
# the least work through every step: two classes of two train and two val images, 32-pixel crops, one run each;
# tau 0.005 leaves 40 used (channel, class) pairs, two channels used by both classes (stage 2 has candidates)
SMALLEST = Workload(classes=2, train_per_class=2, val_per_class=2, batch_size=4, resize=40, crop=32, threads=1,
                    workers=0, tau=0.005, repeat=1)


def data_root(workdir):
    return os.path.join(workdir, "data")


def add_args(p):
    """The workload flags (both sides get the same)."""
    d = DEFAULT
    g = p.add_argument_group("workload (both sides get the same)")
    g.add_argument("--classes", type=int, default=d.classes, help="class folders (default %(default)s)")
    g.add_argument("--train_per_class", type=int, default=d.train_per_class,
                   help="train images per class (default %(default)s)")
    g.add_argument("--val_per_class", type=int, default=d.val_per_class,
                   help="val images per class (default %(default)s)")
    g.add_argument("--resize", type=int, default=d.resize,
                   help="shorter side after resizing (default %(default)s; the paper's 256)")
    g.add_argument("--crop", type=int, default=d.crop, help="center crop (default %(default)s; the paper's 224)")
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="batch size of both sides (default %(default)s, the default of both code bases)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads, set in every child (default: os.cpu_count())")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of every implementation (default: each side's own default)")
    g.add_argument("--tau", type=float, default=d.tau,
                   help="stage-2 tau (default %(default)s: random weights spread attribution thinly)")
    g.add_argument("--repeat", type=int, default=d.repeat,
                   help="runs of each measured part in its process, the fastest counts (default %(default)s)")
    g.add_argument("--no_naive", dest="naive", action="store_false",
                   help="skip the extra naive rows (they make dozens of passes: slow at full size)")
    return p


def build_model(requires_grad=False):
    """ResNet-50 with random weights (seed 0) and its layer LAYER. ``requires_grad=True``: the parameters in
    their default state, as the published scripts leave them (their forward passes then record the whole graph)."""
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for prm in model.parameters():
        prm.requires_grad_(requires_grad)
    return model, model.get_submodule(LAYER)


def folder_bytes(folder):
    """(bytes, files) below ``folder``."""
    total, files = 0, 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
            files += 1
    return total, files
