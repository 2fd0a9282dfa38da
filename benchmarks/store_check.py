"""What checking a store costs when a stage opens it (``utils.files.store.Store.check_arrays``).

  python -m benchmarks.store_check [--gib 1.0] [--repeat 3] [--dir /tmp]

Writes a complete store of ``--gib`` GiB of arrays (attributions float16, targets, predictions, patch sums
float32 with random bytes, in the ImageNet layout of resnet50's layer4.2.conv3: 2048 channels, 512 x 1 x 1
patch sums) the way stage 1 writes one (chunks merged, ``finish`` records the sha256), then times, fastest of
``--repeat``: the header-and-length check alone (what a store above ``FULL_CHECK`` costs when no array changed
since its manifest) and the full check with sha256 (every open of a store up to ``FULL_CHECK``), both with the
files in the page cache, and the sha256 written by ``finish``.
"""
import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from utils.files import names
from utils.files.store import ARRAYS, FULL_CHECK, Store


def make_store(folder, gib, c_out=2048, c_in=512):
    row = c_out * 2 + 8 + 8 + c_in * 4
    n = int(gib * (1 << 30)) // row
    shapes = {"attributions": ((n, c_out), np.float16), "targets": ((n,), np.int64),
              "predictions": ((n,), np.int64), "patch_sums": ((n, c_in, 1, 1), np.float32)}
    st, _ = Store.create_or_resume(folder, {"num_images": n, "chunk_size": n}, shapes)
    rng = np.random.default_rng(0)
    for name, (shape, dtype) in shapes.items():  # random bytes, written in place as the merge does
        a = np.lib.format.open_memmap(st.path(name), mode="r+")
        step = max(1, (64 << 20) // max(1, a[0].nbytes))
        for lo in range(0, n, step):
            a[lo:lo + step] = rng.integers(0, 100, size=a[lo:lo + step].shape).astype(dtype)
        a.flush()
        del a
    open(names.progress_chunk(st.folder, 0, merged=True), "w").close()  # the one chunk, merged
    t = time.perf_counter()
    st.finish(1)
    return st, n, time.perf_counter() - t


def fastest(f, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    work = tempfile.mkdtemp(dir=a.dir)
    try:
        st, n, finish_s = make_store(os.path.join(work, "m_channel_importances"), a.gib)
        size = sum(os.path.getsize(st.path(name)) for name in ARRAYS)
        opened = Store.open(st.folder)
        header = fastest(lambda: opened.check_arrays(full=False), a.repeat)
        full = fastest(lambda: opened.check_arrays(full=True), a.repeat)
        print(f"store of {n} rows, {size / (1 << 30):.2f} GiB of arrays (FULL_CHECK {FULL_CHECK / (1 << 30):.2f} GiB)")
        print(f"finish (sha256 of every array, read back once): {finish_s:.2f} s")
        print(f"open check, header and length only:  {header * 1000:.1f} ms")
        print(f"open check, with sha256:             {full:.2f} s ({size / full / 1e9:.2f} GB/s)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
