"""Stage 1's CPU decoding, per core and through the loader, in one run: PIL's decode alone, today's path
(decode + Resize(256) + CenterCrop(224) + to uint8 tensor), the --fast_resize path (utils/data/cpu_decode.py), and
the stage-1 loader alone (no model) with 2 worker processes.

  python -m benchmarks.studies.cpu_decode [--images 400] [--large 200] [--repeat 3] [--workers 2]

Files: ``--images`` generated 500 x 375 JPEGs (benchmarks/make_jpegs.py, about 75 kB each: ImageNet's most
common size, where --fast_resize cannot decode at reduced size) and ``--large`` 1000 x 750 ones (where it
decodes at half size). Per-core rates: one process, one thread, files already in the page cache, the
best of ``--repeat`` rounds (each round measures every path once, in turn, so that a busy machine
disturbs them alike). Loader: ``folders.make_loader`` over the dataset as stage 1 builds it, batches of 64,
``--workers`` worker processes, images/s over all files after the first batch.
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
import time

import torch
from PIL import Image

from benchmarks import make_jpegs
from utils.data import cpu_decode
from utils.data import folders


def decode_only(raw):
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


def today(raw, transform=folders.eval_transform_uint8()):
    with Image.open(io.BytesIO(raw)) as im:
        return transform(im.convert("RGB"))


def fast(raw):
    return cpu_decode.fast_load(io.BytesIO(raw))


PATHS = (("PIL decode alone", decode_only), ("decode + Resize + CenterCrop + tensor (default)", today),
         ("--fast_resize (utils/data/cpu_decode.py)", fast))


def per_core(raws, repeat):
    """{path name: best images/s over ``repeat`` rounds}."""
    best = {}
    for _ in range(repeat):
        for name, fn in PATHS:
            t = time.perf_counter()
            for r in raws:
                fn(r)
            best[name] = max(best.get(name, 0.0), len(raws) / (time.perf_counter() - t))
    return best


def loader_rate(root, workers, fast_resize):
    ds = folders.image_folder(root, "train")
    if fast_resize:
        cpu_decode.use_fast_resize(ds)
    else:
        ds.transform = folders.eval_transform_uint8()
    batches = folders.batches_of(list(range(len(ds))), 64)
    loader = folders.make_loader(ds, batches, workers, "cpu", "keep")
    n, t = 0, None
    for images, _ in loader:
        if t is None:
            t = time.perf_counter()  # after the first batch: the workers are up
        else:
            n += len(images)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--large", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="cpu_decode_")
    try:
        make_jpegs.write_jpegs(os.path.join(work, "std"), args.images, processes=os.cpu_count() or 1)
        sets = [("500 x 375", os.path.join(work, "std"))]
        if args.large:
            make_jpegs.write_jpegs(os.path.join(work, "large"), args.large, processes=os.cpu_count() or 1,
                                   seed=1, size=(1000, 750))
            sets.append(("1000 x 750", os.path.join(work, "large")))
        print(f"{os.cpu_count()} cores, 1 thread per measurement, best of {args.repeat} rounds; loader: "
              f"{args.workers} workers, batches of 64")
        print("| files | path | images/s | vs decode alone |")
        print("| --- | --- | ---: | ---: |")
        for label, root in sets:
            raws = []
            for d, _, files in sorted(os.walk(os.path.join(root, "train"))):
                for f in sorted(files):
                    with open(os.path.join(d, f), "rb") as fh:
                        raws.append(fh.read())
            rates = per_core(raws, args.repeat)
            dec = rates[PATHS[0][0]]
            for name, _ in PATHS:
                print(f"| {label} | {name} | {rates[name]:.0f} | {dec / rates[name]:.2f}x the time |", flush=True)
            for fr in (False, True):
                r = loader_rate(root, args.workers, fr)
                per = rates[PATHS[2 if fr else 1][0]]
                print(f"| {label} | stage-1 loader, {args.workers} workers{', --fast_resize' if fr else ''} | "
                      f"{r:.0f} | {100 * r / (args.workers * per):.0f} % of {args.workers} x its per-core rate |",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
