"""Small copies of the Fashion-MNIST run's pictures for docs/real_images.md (JPEG, together well under 200 KB).

Usage: python -m demo.fashion_pictures [--report fmnist_out/run/report.json] [--docs docs]
Reads the plots that report.json names and writes, scaled down to --width pixels:
  docs/fmnist_density.jpg       the strongest split's two density plots side by side
  docs/fmnist_top_images.jpg    its contact sheet (original channel, D1, D2)
  docs/fmnist_feature_vis.jpg   its feature visualizations (when the run made them)
  docs/fmnist_sae_view.jpg      its SAE view (when the run made it)
  docs/fmnist_density_weak.jpg  the density plots of the split with the weakest separation (when it is another)
"""
import argparse
import json

from PIL import Image

from demo.docs_pictures import density_pair, write_pictures
from utils.run import cli


def weakest(splits):
    """The split whose smaller separation is smallest (None if there is only one split)."""
    if len(splits) < 2:
        return None
    return min(splits[1:], key=lambda s: min(s["sep_concept1"] or 0, s["sep_concept2"] or 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default="fmnist_out/run/report.json", help="demo/run_fashion.py's report.json")
    p.add_argument("--docs", default="docs", help="output folder (default docs)")
    p.add_argument("--width", type=int, default=640, help="width of each picture in pixels (default 640)")
    p.add_argument("--quality", type=int, default=65, help="JPEG quality (default 65)")
    args = p.parse_args(argv)
    with open(args.report) as f:
        rep = json.load(f)
    first = rep["splits"][0]
    pictures = {"fmnist_density.jpg": density_pair(first["plots"]),
                "fmnist_top_images.jpg": Image.open(first["plots"]["top_images"])}
    if first.get("feature_vis"):
        pictures["fmnist_feature_vis.jpg"] = Image.open(first["feature_vis"]["figure"])
    if first.get("sae_view"):
        pictures["fmnist_sae_view.jpg"] = Image.open(first["sae_view"]["figure"])
    weak = weakest(rep["splits"])
    if weak is not None:
        pictures["fmnist_density_weak.jpg"] = density_pair(weak["plots"])
        pictures["fmnist_top_images_weak.jpg"] = Image.open(weak["plots"]["top_images"])
    total = write_pictures(pictures, args.docs, args.width, args.quality)
    print(f"together {total / 1024:.0f} KB")


if __name__ == "__main__":
    cli.run(main)  # a missing report: one line and exit status 2
