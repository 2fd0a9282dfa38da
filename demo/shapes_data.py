"""A procedurally generated ImageFolder: coloured, textured shapes; one class per (colour, texture) pair.

Every image shows one shape (circle, square, triangle or cross, at random: the shape is not part
of the class) filled with a texture (stripes, dots or solid) in a colour (red, green or blue,
with some jitter of hue, saturation and brightness), at a random size, position and
tilt, on a noisy greyish background. A class is a (colour, texture) pair, so classes share parts:
"red_striped" and "red_dotted" share their colour, "red_striped" and "blue_striped" their texture,
and "red_striped" and "blue_dotted" nothing at all.

The images are drawn at 64 x 64 pixels and saved as PNG files under ``root/train/<class>/`` and
``root/val/<class>/``; everything follows from the seed (each image has its own seed, so the same
image comes out whatever the number of images asked for). The stage scripts read them with the
paper's evaluation transform (resize 256, center crop 224): the crop keeps the central 56 x 56
pixels of the drawing, and shapes are kept inside it.

Command line: python -m demo.shapes_data OUT_DIR [--train_per_class N] [--val_per_class N] [--seed S]
"""
import argparse
import colorsys
import json
import os
import shutil

import numpy as np
from PIL import Image

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": 0.0, "green": 0.33, "blue": 0.62}  # hue of each colour class
TEXTURES = ("striped", "dotted", "solid")
HUE_JITTER = 0.03
ROTATION = 0.15  # radians: shapes stand nearly upright (training adds flips and quarter turns)
MARGIN = 8  # the eval transform's center crop removes 4 px per side of a 64 px image; keep 4 more


def class_names(colours=tuple(COLOURS), textures=TEXTURES):
    """Class folder names ``<colour>_<texture>`` (ImageFolder sorts them; that order is the class index)."""
    return sorted(f"{c}_{t}" for c in colours for t in textures)


def _shape_mask(shape, cx, cy, r, angle, yy, xx):
    """Boolean (SIZE, SIZE) mask of a shape centred at (cx, cy) with 'radius' r, rotated by angle."""
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # rotated coordinates
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":
        # equilateral triangle with circumradius r: inside all three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= (np.cos(t) * dx + np.sin(t) * dy) <= r * 0.55
        return inside
    if shape == "cross":
        w = r * 0.36
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    raise ValueError(shape)


def _texture(texture, rng, yy, xx):
    """Float (SIZE, SIZE) in [0, 1]: 1 where the shape takes its main colour, 0 where its second one."""
    if texture == "solid":
        return np.ones_like(xx, dtype=np.float64)
    if texture == "striped":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(5.0, 7.0)
        phase = rng.uniform(0, 2 * np.pi)
        return (np.cos(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase) > 0).astype(float)
    if texture == "dotted":
        period = rng.uniform(6.0, 8.0)
        ox, oy = rng.uniform(0, period, 2)
        fx = np.mod(xx - ox, period) - period / 2
        fy = np.mod(yy - oy, period) - period / 2
        return (fx ** 2 + fy ** 2 > (period * 0.28) ** 2).astype(float)  # dots of the second colour
    if texture == "checkered":
        period = rng.uniform(7.0, 9.0)
        ox, oy = rng.uniform(0, period, 2)
        return ((np.floor((xx - ox) / (period / 2)) + np.floor((yy - oy) / (period / 2))) % 2).astype(float)
    raise ValueError(texture)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def draw(colour, texture, seed):
    """One RGB image (SIZE, SIZE, 3) uint8 of a ``colour`` ``texture`` shape, from its own seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = rng.uniform(13.0, 19.0)
    lo, hi = MARGIN + r, SIZE - MARGIN - r
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    mask = _shape_mask(shape, cx, cy, r, rng.uniform(-ROTATION, ROTATION), yy, xx)
    main = _hsv(COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    second = main * rng.uniform(0.15, 0.35)  # a dark shade of the main colour
    tex = _texture(texture, rng, yy, xx)[..., None]
    fill = tex * main + (1 - tex) * second
    bg = _hsv(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.75))
    img = np.broadcast_to(bg, (SIZE, SIZE, 3)) + rng.normal(0, 0.04, (SIZE, SIZE, 3))
    img = np.where(mask[..., None], fill, img)
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def generate(root, train_per_class=100, val_per_class=30, seed=0):
    """Write ``root/{train,val}/<colour>_<texture>/NNNN.png``; returns the class names (in class-index order).

    Rewrites ``root`` unless it already holds exactly this data set (recorded in root/dataset.json).
    """
    spec = {"train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed,
            "colours": COLOURS, "textures": list(TEXTURES), "shapes": list(SHAPES), "size": SIZE, "version": 2}
    info_path = os.path.join(root, "dataset.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            if json.load(f) == spec:
                return class_names()
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    if os.path.exists(info_path):
        os.remove(info_path)
    for split_id, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c_id, colour in enumerate(COLOURS):
            for t_id, texture in enumerate(TEXTURES):
                folder = os.path.join(root, split, f"{colour}_{texture}")
                os.makedirs(folder, exist_ok=True)
                for i in range(n):
                    img = draw(colour, texture, seed=(seed, split_id, c_id, t_id, i))
                    Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"), compress_level=1)
    with open(info_path, "w") as f:
        json.dump(spec, f, indent=1)
    return class_names()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train_per_class", type=int, default=100)
    p.add_argument("--val_per_class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    names = generate(a.out_dir, a.train_per_class, a.val_per_class, a.seed)
    print(f"wrote {len(names)} classes to {a.out_dir}: {', '.join(names)}")


if __name__ == "__main__":
    main()
