"""Small copies of the demo's pictures for README.md and docs/ (kept under docs/, a few hundred KB in all).

Usage: python -m demo.docs_pictures [--report demo_out/report.json] [--docs docs]
Reads the plots that report.json names and writes, scaled down to --width pixels:
  docs/demo_density.jpg       the two density plots side by side
  docs/demo_top_images.jpg    the contact sheet (original channel, D1, D2)
  docs/demo_feature_vis.jpg   the feature visualizations, laid out like the paper's Figure 1
"""
import argparse
import json
import os

from PIL import Image


def scaled(image, width):
    """``image`` (PIL) scaled to ``width`` pixels wide (never enlarged), RGB."""
    image = image.convert("RGB")
    if image.width <= width:
        return image
    return image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)


def side_by_side(images):
    """The images in one row on white, tops aligned."""
    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def density_pair(plots):
    """The two density plots that a report's ``plots`` names (concept 1, concept 2), side by side."""
    return side_by_side([Image.open(plots["density_concept1"]).convert("RGB"),
                         Image.open(plots["density_concept2"]).convert("RGB")])


def write_pictures(pictures, folder, width, quality):
    """Write each ``{file name: PIL image}`` into ``folder`` as a JPEG scaled to ``width``; print the sizes and
    return their total in bytes."""
    os.makedirs(folder, exist_ok=True)
    total = 0
    for name, image in pictures.items():
        path = os.path.join(folder, name)
        scaled(image, width).save(path, quality=quality, optimize=True)
        total += os.path.getsize(path)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KB")
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default="demo_out/report.json", help="the demo's report.json")
    p.add_argument("--docs", default="docs", help="output folder (default docs)")
    p.add_argument("--width", type=int, default=900, help="width of each picture in pixels (default 900)")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality (default 80)")
    args = p.parse_args(argv)
    with open(args.report) as f:
        rep = json.load(f)
    os.makedirs(args.docs, exist_ok=True)
    plots = rep["plots"]
    pictures = {"demo_density.jpg": density_pair(plots), "demo_top_images.jpg": Image.open(plots["top_images"])}
    if rep.get("feature_vis_png"):
        pictures["demo_feature_vis.jpg"] = Image.open(rep["feature_vis_png"])
    write_pictures(pictures, args.docs, args.width, args.quality)


if __name__ == "__main__":
    main()
