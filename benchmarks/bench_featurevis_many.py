"""Feature visualizations of K channels: one optimization per channel against one batched optimization of all
of them (``utils.featurevis.render.visualize_many``), on the same work.

Each channel c of ResNet-50 (torchvision, random weights: nothing downloaded) has three targets, as a
checkpoint of stage 3 gives: the original filter W[c] and D1, D2 = W[c] on the first and on the second half of
its input channels. one by one: ``render.visualize`` per channel (what stage 4 does with --fv_batch_targets 0);
batched: ``render.visualize_many`` of the K channels, every step's crops of all 3 K images sharing the model's
batches (stage 4 with --fv_batch_targets 3 K). Same seeds, so the images of the two agree up to float
rounding; the maximum difference is printed.

  python -m benchmarks.bench_featurevis_many [--channels 4] [--size 64] [--steps 2] [--crops 2]
      [--layer layer4.2.conv3] [--batch_size 0]
The paper's settings on a GPU: --size 512 --steps 256 --crops 32 --channels 50 --device cuda.
"""
import argparse
import time

import torch

from benchmarks.bench_featurevis import spectrum, workloads
from utils.featurevis import render


def channel_groups(conv, channels, seed):
    """[(weights (3, C_in, kh, kw), bias or None, seed)] for each channel: W[c], its first and second half."""
    out = []
    for c in channels:
        w = conv.weight[c].detach()
        keep = (torch.arange(w.shape[0]) < w.shape[0] // 2).float().view(-1, 1, 1)
        b = None if conv.bias is None else conv.bias[c].detach().repeat(3)
        out.append((torch.stack([w, w * keep, w * (1 - keep)]), b, seed))
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def compare(channels, size, steps, crops, layer="layer4.2.conv3", batch_size=0, device="cpu"):
    """The visualizations of ``channels`` channels of ResNet-50 (seed 0, random weights) one by one and batched,
    on the same work after a warm-up: (seconds one by one, seconds batched, max |image difference|)."""
    model = workloads(["resnet50"])[0][1].to(device)
    conv = model.get_submodule(layer)
    groups = channel_groups(conv, range(channels), 0)
    m, q = spectrum(size)
    net = render.ModelInput(model, conv, device=device)
    warm = render.Maco(m, q, size, 1, crops, batch_size=batch_size or None, progress=False)
    run = render.Maco(m, q, size, steps, crops, batch_size=batch_size or None, progress=False)
    timed(lambda: render.visualize(net, *groups[0][:2], 0, warm))  # warm-up, waited for
    alone, t_alone = timed(lambda: [render.visualize(net, w, b, s, run) for w, b, s in groups])
    many, t_many = timed(lambda: render.visualize_many(net, groups, run))
    return t_alone, t_many, max(float((a["images"] - b["images"]).abs().max()) for a, b in zip(alone, many))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=4, help="K: channels visualized")
    p.add_argument("--size", type=int, default=64, help="S: side of each image")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--crops", type=int, default=2, help="crops of each image per step")
    p.add_argument("--layer", default="layer4.2.conv3")
    p.add_argument("--batch_size", type=int, default=0, help="crops per forward (0: all of a run's crops)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    t_alone, t_many, diff = compare(args.channels, args.size, args.steps, args.crops, args.layer, args.batch_size,
                                    args.device)
    k = args.channels
    print(f"{args.device}, {torch.get_num_threads()} threads; ResNet-50 (random weights) {args.layer}; K = {k} "
          f"channels x 3 targets; S = {args.size}, {args.steps} steps, {args.crops} crops per image per step")
    print(f"one by one: {t_alone / k:.3f} s per channel; batched: {t_many / k:.3f} s per channel; "
          f"one by one / batched = {t_alone / t_many:.2f}; max |image difference| = {diff:.3g}")


if __name__ == "__main__":
    main()
