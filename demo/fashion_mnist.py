"""Fashion-MNIST (Zalando product photos, 28 x 28 grey, 10 classes) from its IDX files into an ImageFolder.

The IDX format (LeCun's MNIST format): a big-endian header, then the raw values in C order.
  bytes 0-1   0x0000
  byte  2     the value type (0x08: unsigned byte, the only one these files use)
  byte  3     the number of dimensions d (3 for images: N x rows x columns, 1 for labels: N)
  then d big-endian uint32 sizes, then prod(sizes) values.
So an image file starts with the magic number 0x00000803 (2051), a label file with 0x00000801 (2049).

Debian's package ``dataset-fashion-mnist`` installs the four files (gzip-compressed) under
``/usr/share/datasets/fashion-mnist/``. ``write_image_folder`` turns them into
``OUT/train/<k>_<name>/NNNNN.png`` (the 60,000 training images) and ``OUT/val/<k>_<name>/NNNNN.png`` (the
official 10,000 test images), the first ``per_class`` images of each class in file order. Class folders
are named ``0_tshirt_top`` .. ``9_ankle_boot``, so sorted order (ImageFolder's class index) is the label.
The PNGs are the grey pixels as they are (mode L); torchvision's ImageFolder loader converts them to RGB
(three equal channels).

Command line: python -m demo.fashion_mnist OUT_DIR [--train_per_class N] [--val_per_class N] [--source DIR]
"""
import argparse
import gzip
import json
import os
import shutil

import numpy as np
from PIL import Image

from utils.run import cli
from utils.run.cli import UserError

SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# coarse groups of the classes (what a garment is worn as), for purity beyond the single class
GROUPS = {"upper_body": (0, 2, 3, 4, 6), "trouser": (1,), "footwear": (5, 7, 9), "bag": (8,)}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
UBYTE = 0x08
# Mean and standard deviation of the 60,000 training pixels / 255 (``pixel_stats``; rounded): the stage
# scripts' --mean and --std for the three equal colour channels.
MEAN, STD = 0.2860, 0.3530


def folder_names(classes=CLASSES):
    """ImageFolder class folders in label order: '0_tshirt_top', '1_trouser', ... (sorted order = label order
    while there are at most 10 classes)."""
    def slug(name):
        return "".join(ch if ch.isalnum() else "_" for ch in name.lower().replace("-", "")).strip("_")
    return [f"{k}_{slug(name)}" for k, name in enumerate(classes)]


def class_groups(groups=GROUPS, num_classes=len(CLASSES)):
    """Group index of each class (K,) int array, groups numbered in ``groups``' order."""
    out = np.full(num_classes, -1, dtype=np.int64)
    for g, members in enumerate(groups.values()):
        out[list(members)] = g
    return out


def _open(path):
    """The raw bytes of ``path`` (gzip-compressed when it starts with gzip's magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable gzip file ({e})")
    return raw


def parse_idx(raw, name="<bytes>", magic=None):
    """The array of an IDX file's bytes: uint8 of shape (the header's sizes). ``magic``: the expected magic
    number (2051 images, 2049 labels) or None for any unsigned-byte IDX. Raises UserError (one line) on a wrong
    magic number, a truncated header or a body whose length does not match the sizes."""
    if len(raw) < 4:
        raise UserError(f"{name}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if raw[:2] != b"\0\0" or raw[2] != UBYTE or (magic is not None and found != magic):
        want = f"0x{magic:08x}" if magic is not None else f"0x00000{UBYTE:x}NN"
        raise UserError(f"{name}: magic number 0x{found:08x}, expected {want} (an IDX file of unsigned bytes)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise UserError(f"{name}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    want = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if len(raw) - head != want:
        raise UserError(f"{name}: {len(raw) - head} bytes of data, the header's sizes {list(dims)} need {want}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def read_idx(path, magic=None):
    """``parse_idx`` of the file at ``path`` (gzip or plain)."""
    return parse_idx(_open(path), path, magic)


def find_file(source, stem):
    """``source/stem.gz`` or ``source/stem``, whichever exists; UserError naming the package if neither."""
    for name in (stem + ".gz", stem):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            return path
    if os.path.abspath(source) == os.path.abspath(SOURCE):  # the package's folder (read at call time)
        raise UserError(f"Fashion-MNIST not found ({os.path.join(source, stem)}.gz): {INSTALL_HINT}")
    raise UserError(f"--source {source}: no {stem}.gz or {stem} there")


def load_split(split, source=None):
    """(images (N, 28, 28) uint8, labels (N,) int64) of 'train' (60,000) or 'val' (the official 10,000 test
    images). Checks that the image and label files hold the same number of items and 28 x 28 images."""
    source = SOURCE if source is None else source
    images_path, labels_path = (find_file(source, stem) for stem in FILES[split])
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"{images_path}: {images.ndim} dimensions (expected 3), {labels_path}: {labels.ndim} "
                        f"(expected 1)")
    if len(images) != len(labels):
        raise UserError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise UserError(f"{labels_path}: label {int(labels.max())}, Fashion-MNIST has {len(CLASSES)} classes")
    return images, labels.astype(np.int64)


def first_per_class(labels, per_class, num_classes=len(CLASSES)):
    """Indices (sorted) of the first ``per_class`` items of each class in file order (None: all items)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)]
    return np.sort(np.concatenate(keep))


def pixel_stats(images):
    """(mean, std) of ``images`` / 255 over all pixels (floats): the normalization of MEAN and STD."""
    x = images.astype(np.float64) / 255
    return float(x.mean()), float(x.std())


def write_image_folder(out, train_per_class=None, val_per_class=None, source=None, log=print):
    """Write ``out/{train,val}/<k>_<name>/NNNNN.png`` (NNNNN: the image's index in its IDX file); returns the
    class folder names. ``*_per_class``: the first N images of each class (None: all of them).

    Kept as it is when ``out/dataset.json`` records the same request. Otherwise each split is written into a
    temporary folder next to it and renamed into place when complete, so an interrupted run leaves the
    previous split (or none) behind, never half of one.
    """
    source = SOURCE if source is None else source
    names = folder_names()
    spec = {"source": os.path.abspath(source), "train_per_class": train_per_class, "val_per_class": val_per_class,
            "classes": names, "format": "png, mode L, 28 x 28", "version": 1}
    info_path = os.path.join(out, "dataset.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            if json.load(f) == spec and all(os.path.isdir(os.path.join(out, s)) for s in FILES):
                return names
    splits = {split: load_split(split, source) for split in FILES}  # every file checked before writing
    os.makedirs(out, exist_ok=True)
    if os.path.exists(info_path):
        os.remove(info_path)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images, labels = splits[split]
        keep = first_per_class(labels, per_class)
        final, tmp = os.path.join(out, split), os.path.join(out, f".tmp_{split}")
        shutil.rmtree(tmp, ignore_errors=True)
        for name in names:
            os.makedirs(os.path.join(tmp, name))
        for i in keep:
            Image.fromarray(images[i]).save(os.path.join(tmp, names[labels[i]], f"{i:05d}.png"),
                                                      compress_level=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        log(f"{split}: {len(keep)} images")
    from utils.files import atomic
    atomic.write_json(info_path, spec)
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train_per_class", type=int, default=None, help="training images per class (default: all, 6000)")
    p.add_argument("--val_per_class", type=int, default=None, help="val (test) images per class (default: all, 1000)")
    p.add_argument("--source", default=None, help=f"folder of the IDX files (default {SOURCE})")
    a = p.parse_args(argv)
    names = write_image_folder(a.out_dir, a.train_per_class, a.val_per_class, a.source)
    print(f"wrote {len(names)} classes to {a.out_dir}: {', '.join(names)}")


if __name__ == "__main__":
    cli.run(main)  # a bad input: one line and exit status 2
