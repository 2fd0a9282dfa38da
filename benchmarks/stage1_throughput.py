"""Stage-1 throughput on a GPU box: images/s of the whole stage with CPU decoding and with GPU decoding,
and of the model step alone (attributions + patch sums on batches already on the device).

  python -m benchmarks.stage1_throughput [--images 4096] [--batch_size 256] [--num_workers 16] [--bf16]

Writes ImageNet-sized JPEGs (500 x 375, benchmarks/make_jpegs.py) into a temporary folder, runs the real
stage-1 loop (utils.stages.stage1_pass.run_stage1) on ResNet-50 (random weights, layer4.2.conv3) into a
temporary store, and prints one table. On a machine without CUDA it still runs (small --images), and
the GPU-decoding row then shows the CPU fallback.
"""
import argparse
import os
import shutil
import tempfile
import time

import torch
import torchvision

from benchmarks import make_jpegs
from utils.run import cli
from utils.run import device
from utils.data import folders
from utils.data import gpu_decode
from utils.stages import stage1_pass
from utils.model import loading
from utils.files import store



def run(model, conv, ds, folder, args, device, decoder=None, amp=None):
    summary = folders.dataset_summary(ds)
    info = dict(store.fingerprint("resnet50", "random", loading.weights_sha256(model), "layer4.2.conv3",
                                  loading.layer_geometry(conv), summary, folders.TRANSFORM_DESCRIPTION),
                autocast=amp, decode="gpu" if decoder else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    stage1_pass.run_stage1(model, conv, ds, folder, info,
                      stage1_pass.PassSettings(args.batch_size, device, args.num_workers,
                                          autocast_dtype=torch.bfloat16 if amp else None, channels_last=True,
                                          gpu_decoder=decoder),
                      log=lambda *a: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(ds) / (time.time() - t)


def model_only(model, conv, args, device, amp):
    x = torch.randn(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    steps = max(3, args.images // args.batch_size)
    stage1_pass.stage1_batch(model, conv, x, y, amp)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        stage1_pass.stage1_batch(model, conv, x, y, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch_size / (time.time() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--bf16", action="store_true", help="also measure with bfloat16 autocast")
    args = p.parse_args()
    device = device.select_device(None, 0)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device).to(memory_format=torch.channels_last)
    for prm in model.parameters():
        prm.requires_grad_(False)
    conv = model.get_submodule("layer4.2.conv3")
    work = tempfile.mkdtemp(prefix="stage1_throughput_")
    try:
        make_jpegs.write_jpegs(work, args.images, processes=os.cpu_count() or 1)
        ds = folders.image_folder(work, "train")
        rows = []
        for amp in ([None, "bfloat16"] if args.bf16 else [None]):
            dt = torch.bfloat16 if amp else None
            rows.append((f"model step only{' bf16' if amp else ''}", model_only(model, conv, args, device, dt)))
            rows.append((f"stage 1, CPU decoding{' bf16' if amp else ''}",
                         run(model, conv, ds, os.path.join(work, f"s_cpu_{amp}"), args, device, amp=amp)))
            decoder, raw = gpu_decode.setup(ds, device)
            label = "stage 1, GPU decoding" if decoder else "stage 1, --gpu_decode fallback (CPU)"
            rows.append((label + (" bf16" if amp else ""),
                         run(model, conv, raw, os.path.join(work, f"s_gpu_{amp}"), args, device, decoder, amp)))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"ResNet-50 layer4.2.conv3, {args.images} JPEGs 500x375, batch {args.batch_size}, "
              f"{args.num_workers} workers, {name}")
        print(f"{'what':45s} {'images/s':>10s}")
        for what, ips in rows:
            print(f"{what:45s} {ips:10.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
