"""One torchvision model per family through the four stages (--weights none, generated images), and stage 1's
seconds per image on this machine: the table of docs/models.md.

  python -m benchmarks.families [--models resnet18 vit_b_16 ...] [--per_class 2] [--json FILE] [--threads N]
      [--repeats 3] [--per_image_only MODEL ...]

For every model: its default layer (``--list_layers``' ``last_conv``), then stages 1 to 4 on it as a user runs
them (each script in its own process: stage 1 into a fresh store, stage 2 with --p 0.5, stage 3 on channel 0
with class 0 against class 1, stage 4 --get_quantitative); and on a grouped conv or a Linear layer where the
family has one that is not the default (EXTRA). Stage 3 writes its checkpoint only when the split network's
logits equal the original's, so "ok" in the stage 3 column is the exactness check passed.

Seconds per image: stage 1's own work on a batch of 8 images at 224 x 224 (the forward pass, the head-only
backward, the channel attributions and the patch sums: ``tap.logits_and_layer_grad`` and
``attribution.conv_patch_sums``), the best of --repeats runs (3) after one warm-up, divided by 8; decoding and model
building are not in it (the stage 1 column is the script's whole wall time, start-up included).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAMILIES = [("AlexNet", "alexnet"), ("VGG", "vgg11"), ("ResNet", "resnet18"), ("ResNeXt", "resnext50_32x4d"),
            ("Wide ResNet", "wide_resnet50_2"), ("DenseNet", "densenet121"), ("GoogLeNet", "googlenet"),
            ("Inception v3", "inception_v3"), ("MobileNet v2", "mobilenet_v2"),
            ("MobileNet v3", "mobilenet_v3_small"), ("EfficientNet", "efficientnet_b0"), ("MNASNet", "mnasnet0_5"),
            ("ShuffleNet v2", "shufflenet_v2_x0_5"), ("SqueezeNet", "squeezenet1_0"), ("RegNet", "regnet_y_400mf"),
            ("ConvNeXt", "convnext_tiny"), ("MaxViT", "maxvit_t"), ("Swin", "swin_t"), ("ViT", "vit_b_16")]
EXTRA = {"resnext50_32x4d": "layer4.2.conv2", "regnet_y_400mf": "trunk_output.block4.block4-5.f.b.0",
         "vgg11": "classifier.3", "convnext_tiny": "features.7.2.block.3", "mobilenet_v2": "classifier.1"}
SCRIPTS = ("get_importances_for_classes.py", "get_cosine_similarities.py", "disentangle_channel.py",
           "get_results.py")
RUN = ["--num_workers", "0", "--device", "cpu", "--batch_size", "8"]


def make_data(root, per_class, classes=4):
    """Generated JPEGs in folders named by the first ImageNet WordNet ids (mapped to the 1000 outputs)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    with open(os.path.join(ROOT, "utils", "data", "imagenet_wnids.txt")) as f:
        wnids = f.read().split()[:classes]
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            d = os.path.join(root, split, wnids[c])
            os.makedirs(d, exist_ok=True)
            tint = rng.random(3)
            for i in range(n):
                img = rng.random((240, 260, 3)) * 0.6 + tint * 0.4
                Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(d, f"img{i:03d}.jpg"))
    return root


def run(script, *args):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT)
    line = (r.stderr.strip().splitlines() or ["?"])[-1] if r.returncode else "ok"
    return r.returncode == 0, time.perf_counter() - t, line


def per_image_seconds(model, layer, repeats=3, n=8):
    import torch
    from utils.method import attribution
    from utils.model import loading, tap
    _, view = loading.resolve_layer(model, layer, 224)
    x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 4
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        _, a, g, _ = tap.logits_and_layer_grad(model, view, x, labels)
        x_in = tap.layer_input(model, view, x)
        attribution.channel_attribution(a, g), attribution.conv_patch_sums(x_in, view)
        if i:
            best = min(best, time.perf_counter() - t)
    return best / n, view


def one(family, spec, layer, data, work, stages=True, repeats=3):
    from utils.model import loading
    store, out = os.path.join(work, "store"), os.path.join(work, "out")
    pick = [] if layer is None else ["--layer_of_interest", layer]
    row = {"family": family, "model": spec}
    model, _ = loading.load_model(spec, "none")
    if layer is None:
        layer = loading.default_layer(model, 224)
    row["layer"] = layer
    sec, view = per_image_seconds(model, layer, repeats)
    row.update(kind=view.kind, shape=list(view.module.weight.shape), s_per_image=round(sec, 3))
    steps = [(SCRIPTS[0], ["--data_dir", data, "--model", spec, "--weights", "none", "--store_dir", store, *pick]),
             (SCRIPTS[1], ["--store_dir", store, "--out_dir", out, "--p", 0.5, *pick]),
             (SCRIPTS[2], ["--store_dir", store, "--channel_disentangle", 0, "--classes_for_concept1", 0,
                           "--classes_for_concept2", 1, *pick]),
             (SCRIPTS[3], ["--model_dir", store, "--channel_of_interest", 0, "--classes_for_concept1", 0,
                           "--classes_for_concept2", 1, "--get_quantitative", "--out_dir", out, *pick])]
    for i, (script, args) in enumerate(steps if stages else [], 1):
        good, secs, line = run(script, *args, *RUN)
        row[f"stage{i}"] = "ok" if good else line
        row[f"stage{i}_s"] = round(secs, 1)
        if not good:
            break
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="torchvision names, or NAME:LAYER for one layer (default: one per family and EXTRA)")
    p.add_argument("--per_class", type=int, default=2, help="training images per class (4 classes)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (the per-image time)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up (the best is kept)")
    p.add_argument("--per_image_only", nargs="*", default=[],
                   help="entries of --models to time without running the stages (the per-image seconds only)")
    a = p.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    family_of = {m: f for f, m in FAMILIES}
    # --models in the order given; MODEL:LAYER runs that layer only (no default-layer row)
    wanted = a.models or [m for _, m in FAMILIES]
    jobs = []
    for entry in wanted:
        spec, _, layer = entry.partition(":")
        layers = [layer] if layer else [None] + ([EXTRA[spec]] if spec in EXTRA else [])
        jobs += [(family_of.get(spec, spec), spec, x, entry not in a.per_image_only) for x in layers]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(os.path.join(tmp, "data"), a.per_class)
        for family, spec, layer, stages in jobs:
            rows.append(one(family, spec, layer, data, tempfile.mkdtemp(dir=tmp), stages, a.repeats))
            r = rows[-1]
            print(f"| {r['family']} | `{r['model']}` | `{r['layer']}` | {r['kind']} {tuple(r['shape'])} | "
                  f"{r['s_per_image']} | " + " | ".join(f"{r.get(f'stage{i}', '-')} ({r.get(f'stage{i}_s', '-')} s)"
                                                       for i in range(1, 5)) + " |", flush=True)
            if a.json:  # after every row: a partial run keeps what it measured
                with open(a.json, "w") as f:
                    json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)

if __name__ == "__main__":
    main()
