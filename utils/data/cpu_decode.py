"""Stage 1's decoding on the CPU, and ``--fast_resize``.

Default (what every store made on the CPU holds): PIL decodes the file, ``Resize(256)`` scales the shorter
side to 256 with PIL's antialiased bilinear filter, ``CenterCrop(224)`` keeps the middle, and the worker
sends uint8 (3, 224, 224) (``data.eval_transform_uint8``; normalized on the device).

``--fast_resize`` (opt-in: it changes pixels, so the store's numerics record it) takes two shortcuts:

1. Reduced-size JPEG decoding. libjpeg can decode a JPEG at 1/2 (or 1/4, 1/8) of its size by scaling
   the DCT blocks (PIL's ``Image.draft``), much faster than decoding it whole. Here it decodes at 1/2
   when the image is at least twice the size the resize asks for in both directions (w >= 2 W' and
   h >= 2 H', where (W', H') is the size after Resize(256)); the image then measures (ceil(w / 2),
   ceil(h / 2)) and is resized from there. Smaller scales are not used: libjpeg's scaled IDCT is a
   cruder low-pass filter than the antialiased resize, and at 1/4 a few grey levels on average change.
2. Only the kept region is resized. With (W', H') the resized size and (left, top) the center crop's
   corner in it (torchvision's rounding), the crop covers the source box
       (left * w / W', top * h / H', (left + 224) * w / W', (top + 224) * h / H')
   and PIL's ``resize(..., box=...)`` computes the 224 x 224 output from it directly. The filter is the
   same, but its weights come from box coordinates rounded differently in floating point, so a few
   pixels move by one grey level (about 0.1 % of the pixels where shortcut 1 is not taken).

The attribution difference it makes is measured by ``benchmarks/studies/fast_resize_effect.py``.
"""
import numpy as np
import torch
from PIL import Image

from utils.data.folders import CROP, RESIZE


def resized_size(w, h, resize=RESIZE):
    """(W', H'): the size ``transforms.Resize(resize)`` gives a w x h image (shorter side ``resize``)."""
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def crop_corner(w, h, crop=CROP):
    """(left, top) of ``transforms.CenterCrop(crop)`` in a w x h image (torchvision's rounding)."""
    return int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))


def source_box(w, h, resize=RESIZE, crop=CROP):
    """The box (x0, y0, x1, y1) of a w x h image that Resize(resize) + CenterCrop(crop) keep, in source
    pixels (floats)."""
    rw, rh = resized_size(w, h, resize)
    left, top = crop_corner(rw, rh, crop)
    sx, sy = w / rw, h / rh
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def draft_request(w, h, resize=RESIZE):
    """The size to ask ``Image.draft`` for: at least the resized size and at least half the image, so that
    libjpeg scales by 1/2 when the image is at least twice the resized size in both directions, else not
    at all (PIL takes the largest of 1/8, 1/4, 1/2 that keeps the image at least this large)."""
    rw, rh = resized_size(w, h, resize)
    return max(rw, w // 2, 1), max(rh, h // 2, 1)


def to_uint8_chw(im):
    """PIL RGB image -> uint8 (3, H, W), contiguous."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def fast_load(path, resize=RESIZE, crop=CROP):
    """The file at ``path`` (or a file object) with both shortcuts: uint8 (3, crop, crop)."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", draft_request(*im.size, resize))
        rgb = im.convert("RGB")
    return fast_resize_crop(rgb, resize, crop)


def fast_resize_crop(im, resize=RESIZE, crop=CROP):
    """PIL image -> uint8 (3, crop, crop): the center crop of Resize(resize), resizing the kept box only."""
    w, h = im.size  # the resized shorter side is ``resize`` >= ``crop`` (data.check_transform)
    return to_uint8_chw(im.resize((crop, crop), Image.BILINEAR, box=source_box(w, h, resize, crop)))


class FastLoader:
    """An ImageFolder ``loader`` (path -> image) for ``--fast_resize``: returns the uint8 (3, crop, crop) tensor
    directly; use it with ``transform=None`` (``use_fast_resize`` sets both)."""

    def __init__(self, resize=RESIZE, crop=CROP):
        self.resize, self.crop = resize, crop

    def __call__(self, path):
        return fast_load(path, self.resize, self.crop)


def use_fast_resize(dataset, resize=RESIZE, crop=CROP):
    """Make ``dataset`` (a data.TolerantImageFolder) yield uint8 (3, crop, crop) images with --fast_resize.
    Its placeholder for unreadable files keeps the same shape."""
    dataset.loader = FastLoader(resize, crop)
    dataset.transform = None
    dataset._placeholder = torch.zeros((3, crop, crop), dtype=torch.uint8)
    return dataset
