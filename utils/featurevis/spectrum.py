r"""The magnitude spectrum and colour matrix of the user's training images, computed once and kept in the store.

Two passes over up to N training images (Resize(S) CenterCrop(S) ToTensor, spread evenly over the ImageFolder
order): the pixel colour covariance gives Q (``param.color_matrix``), then M = mean |rfft2(Q^-1 (img - mean))|.
The file ``{store}/feature_vis_spectra/spectrum_S{S}_{key}.npz`` records what made it (class folders, image
counts, file list, the bytes of the images used, S, N); ``key`` is 16 hex digits of that record's sha256, and a
file whose record differs is never used. A store that cannot be written keeps nothing: the file is read from
and written to the user's cache folder instead (``utils.files.cache``).
"""
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from utils.data import folders
from utils.featurevis.param import color_covariance, color_matrix, color_moments, magnitudes
from utils.files import atomic, cache, names, reading
from utils.errors import UserError


def spectrum_from_images(batches):
    """Colour matrix and magnitude spectrum of a set of images, from two passes.

    ``batches``: a callable returning an iterator of (N, 3, S, S) tensors in [0, 1].
    Returns dict(magnitude (3, S, S//2+1) = mean |rfft2(Q^-1 (img - mean))|, q (3, 3), mean (3,),
    cov (3, 3), images), float32 tensors.
    """
    total, outer, count, n = 0, 0, 0, 0
    for b in batches():
        t, o, c = color_moments(b)
        total, outer, count, n = total + t, outer + o, count + c, n + len(b)
    if n == 0:
        raise UserError("no readable training image for the feature-visualization spectrum")
    mean, cov = color_covariance(total, outer, count)
    q = color_matrix(cov)
    acc = 0
    for b in batches():
        acc = acc + magnitudes(b, q, mean).sum(dim=0)
    return {"magnitude": (acc / n).float(), "q": q.float(), "mean": mean.float(), "cov": cov.float(), "images": n}


def files_sha256(paths):
    """sha256 over the bytes of the files ``paths``, in order (what the images hold, not only their names)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def spectrum_key(summary, size, n_images, content_sha256):
    """What a spectrum was made from (the training split's class folders, image counts and file list, the
    bytes of the images used, the size, the number of images): a dict, and the 16 hex digits of its sha256
    that name the file."""
    meta = {"classes": summary["classes"], "images_per_class": summary["images_per_class"],
            "files_sha256": summary["files_sha256"], "content_sha256": content_sha256,
            "size": int(size), "images": int(n_images),
            "transform": f"Resize({size}) CenterCrop({size}) ToTensor", "version": 1}
    return meta, hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def spectrum_images(ds, n):
    """Dataset indices of ``n`` training images spread evenly over the ImageFolder order (all classes)."""
    return sorted(set(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int).tolist()))


def load_or_make_spectrum(store_dir, data_dir, size, n_images, batch_size, num_workers):
    """The colour matrix and spectrum of the training images at size S, computed once and kept in the store
    (``names.spectrum_cache``) with what made it (a different data set, even one with the same file names,
    another size or number of images gets its own file; a file whose record differs is never used).
    Returns (dict, path, reused)."""
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    ds = folders.image_folder(data_dir, "train", transform=tf)
    idx = spectrum_images(ds, n_images)
    meta, key = spectrum_key(folders.dataset_summary(ds), size, n_images, files_sha256(ds.samples[i][0] for i in idx))
    path = names.spectrum_cache(store_dir, size, key)
    for found in cache.candidates(path, store_dir):  # the store's, else the user's cache folder's
        if not os.path.isfile(found):
            continue
        try:
            z = reading.load_npz(found)
            if "meta" not in z:
                raise reading.Damaged(found, "not a spectrum cache (no record of what made it)")
            if json.loads(str(z["meta"])) == meta:
                return {k: torch.from_numpy(z[k]) for k in ("magnitude", "q", "mean", "cov")}, found, True
        except (reading.Damaged, KeyError, ValueError) as e:  # a cache: compute it again, and say so
            print(f"{found}: a damaged spectrum cache ({getattr(e, 'problem', e)}): computing it again")
    batches = folders.batches_of(idx, max(1, batch_size))

    def iterate():
        loader = folders.make_loader(ds, batches, num_workers, "cpu", unreadable="skip")
        return (im for im, _ in tqdm(loader, desc=f"spectrum of {len(idx)} training images", unit="batch",
                                     dynamic_ncols=True))
    spec = spectrum_from_images(iterate)
    path = cache.write_path(path, store_dir)
    atomic.save_npz(path, {"magnitude": spec["magnitude"].numpy(), "q": spec["q"].numpy(),
                           "mean": spec["mean"].numpy(), "cov": spec["cov"].numpy(),
                           "meta": np.asarray(json.dumps(meta))})
    return spec, path, False
