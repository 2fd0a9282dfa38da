"""Generated ImageNet-sized JPEGs for the throughput benchmarks: an ImageFolder ``ROOT/train/classNN/*.jpg``.

Each image is 500 x 375 (ImageNet's most common size): a smooth random colour field (bilinear upsampling of a
12 x 16 random grid) plus fine noise, saved at quality 90, about 80 kB a file (close to ImageNet's average).
Image i depends only on (seed, i), so any number of processes writes the same files.

  python -m benchmarks.make_jpegs ROOT [--images 8000] [--classes 10] [--processes 16]
"""
import argparse
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 500, 375


def jpeg_image(i, seed=0, size=(WIDTH, HEIGHT)):
    """The PIL image number ``i``: smooth colours plus noise of up to 20 grey levels."""
    rng = np.random.default_rng([seed, i])
    small = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-20, 21, size=smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def class_folder(c):
    """Folder name of class ``c``: the c-th ImageNet WordNet id, so that a 1000-output ImageNet model maps
    folder c to its output c (utils/data/classmap.py) and the labels are the folder indices, as before."""
    from utils.data.classmap import imagenet_wnids
    return imagenet_wnids()[c]


def _write(job):
    root, lo, hi, classes, seed, size = job
    for i in range(lo, hi):
        d = os.path.join(root, "train", class_folder(i % classes))
        jpeg_image(i, seed, size).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    return hi - lo


def write_jpegs(root, n, classes=10, processes=1, seed=0, size=(WIDTH, HEIGHT)):
    """Write ``n`` JPEGs of ``size`` (w, h) under ``root/train`` (``classes`` class folders) with
    ``processes`` processes."""
    for c in range(min(classes, n)):
        os.makedirs(os.path.join(root, "train", class_folder(c)), exist_ok=True)
    step = max(1, -(-n // max(1, processes * 4)))
    jobs = [(root, lo, min(n, lo + step), classes, seed, tuple(size)) for lo in range(0, n, step)]
    if processes <= 1:
        return sum(map(_write, jobs))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_write, jobs))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    t = time.time()
    n = write_jpegs(args.root, args.images, args.classes, args.processes)
    print(f"wrote {n} JPEGs of {WIDTH} x {HEIGHT} under {args.root}/train in {time.time() - t:.1f} s "
          f"with {args.processes} processes")


if __name__ == "__main__":
    main()
