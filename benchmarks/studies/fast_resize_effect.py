"""How much --fast_resize moves stage 1's attributions (as benchmarks/studies/tf32_effect.py does for TF32).

Stage 1 (utils.stages.stage1_pass.run_stage1) runs twice on the CPU over the same generated JPEGs, ResNet-50 with
random weights (seed 0; layer4.2.conv3): once with the default decoding (PIL decode, Resize(256),
CenterCrop(224)) and once with --fast_resize (utils/data/cpu_decode.py: half-size JPEG decoding for images at
least twice the resize target, resize of the crop's region only). Files: ``--images`` of 500 x 375 (no
reduced-size decoding possible: only the resize shortcut acts) and as many of 1000 x 750 (decoded at half
size). Random weights: the numbers show the size of the input change's effect, not a property of the
paper's trained ResNet-50.

  python -m benchmarks.studies.fast_resize_effect [--images 24] [--threads 2]
"""
import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torchvision

from benchmarks import make_jpegs
from benchmarks.gpu_steps import describe_difference
from utils.data import cpu_decode
from utils.data import folders
from utils.stages import stage1_pass as stage1_module
from utils.model import loading
from utils.files import store


def stage1(root, folder, fast, model, conv, threads):
    ds = folders.image_folder(root, "train")
    if fast:
        cpu_decode.use_fast_resize(ds)
    else:
        ds.transform = folders.eval_transform_uint8()
    info = dict(store.fingerprint("resnet50", "random", loading.weights_sha256(model), "layer4.2.conv3",
                                  loading.layer_geometry(conv), folders.dataset_summary(ds), folders.TRANSFORM_DESCRIPTION),
                autocast=None, decode="cpu", numerics=stage1_module.numerics("cpu", threads, fast_resize=fast))
    stage1_module.run_stage1(model, conv, ds, folder, info,
                             stage1_module.PassSettings(16, torch.device("cpu"), 0, uint8_images=True),
                             log=lambda *a: None)
    return {n: np.load(os.path.join(folder, n + ".npy")) for n in store.ARRAYS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24, help="files of each size")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    conv = model.get_submodule("layer4.2.conv3")
    work = tempfile.mkdtemp(prefix="fast_resize_effect_")
    try:
        for label, size, seed in (("500 x 375", (500, 375), 0), ("1000 x 750", (1000, 750), 1)):
            root = os.path.join(work, f"d{seed}")
            make_jpegs.write_jpegs(root, args.images, classes=4, processes=os.cpu_count() or 1, seed=seed,
                                   size=size)
            ref = stage1(root, os.path.join(work, f"ref{seed}"), False, model, conv, args.threads)
            fast = stage1(root, os.path.join(work, f"fast{seed}"), True, model, conv, args.threads)
            print(f"{label} ({args.images} JPEGs): --fast_resize vs default: {describe_difference(ref, fast)}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
