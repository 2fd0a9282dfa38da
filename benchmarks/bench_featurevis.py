"""Feature-visualization benchmark: all targets of a checkpoint in one batch, forward pass stopped at the layer,
against one full-network run per target (how a user of a generic feature-visualization library does it).

ours:     utils.featurevis.render.visualize: the original channel and D1, D2 optimized together; every step sends
          the crops of the three images through the model up to the layer only, the targets are the three
          filters on the layer's input.
separate: for each target its own MACO run (same parametrization, crops, noise, NAdam) on the whole
          network: the original model with a hook on the layer's output for the original channel, the
          disentangled network (utils.disentangle.disentangled_model) with a hook on L' for D1 and D2; every
          forward runs to the logits.

Workloads (CPU, random weights, nothing downloaded): the demo CNN (demo.model, layer conv_out) and torchvision's
ResNet-50 (weights=None, layer4.2.conv3 and, to show what stopping at the layer saves, layer3.5.conv3), S = 224.

  python -m benchmarks.bench_featurevis [--steps 3] [--crops 4] [--models demo resnet50] [--json out.json]
"""
import argparse
import json
import time

import torch

from utils import disentangle
from utils.data import folders
from utils.featurevis import objectives, param, render, transform
from utils.method import split

CHANNEL = 1


def workloads(names):
    out = []
    if "demo" in names:
        from demo.model import shapes_cnn
        torch.manual_seed(0)
        m = shapes_cnn().eval()
        out.append(("demo CNN", m, "conv_out"))
    if "resnet50" in names:
        import torchvision
        torch.manual_seed(0)
        m = torchvision.models.resnet50(weights=None).eval()
        out += [("ResNet-50", m, "layer4.2.conv3"), ("ResNet-50", m, "layer3.5.conv3")]
    for _, m, _ in out:
        for p in m.parameters():
            p.requires_grad_(False)
    return out


def synthetic_checkpoint(conv, channel):
    """Split W[c] by the halves of its inputs: D1 = first half, D2 = second half, R = 0."""
    w = conv.weight[channel].detach()
    half = w.shape[0] // 2
    keep = torch.zeros(w.shape[0], 1, 1)
    keep[:half] = 1
    filters = torch.stack([w * keep, w * (1 - keep), w * 0])
    return split.checkpoint_state_dict(filters, None if conv.bias is None else conv.bias[channel].detach())


def spectrum(size):
    fy = torch.fft.fftfreq(size).abs()[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    m = (1.0 / torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0 / size)).expand(3, -1, -1).clone()
    cov = torch.tensor([[0.07, 0.06, 0.05], [0.06, 0.07, 0.06], [0.05, 0.06, 0.07]], dtype=torch.float64)
    return m.float(), param.color_matrix(cov).float()


def separate_run(net, hooked, row, magnitude, q, size, steps, crops, seed, lr=1.0):
    """One target on the whole network: the map ``row`` of ``hooked``'s output, every forward to the logits."""
    gen = torch.Generator().manual_seed(seed)
    phase = torch.randn((1,) + tuple(magnitude.shape), generator=gen).requires_grad_(True)
    opt = torch.optim.NAdam([phase], lr=lr)
    qu = param.unit_color_matrix(q.double()).float()
    seen = {}
    handle = hooked.register_forward_hook(lambda mod, i, o: seen.__setitem__("a", o))
    try:
        for _ in range(steps):
            opt.zero_grad()
            img = param.maco_image(magnitude, phase, qu)
            crops_of = transform.crops_of(img, transform.crop_boxes(1, crops, size, gen), folders.CROP)
            x = transform.normalize(transform.add_noise(crops_of, gen), folders.MEAN, folders.STD)
            net(x)
            loss = -seen["a"][:, row].clamp_min(0).mean(dim=(1, 2)).mean()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return param.maco_image(magnitude, phase, qu).detach()


def bench(name, model, layer, size, steps, crops):
    conv = model.get_submodule(layer)
    sd = synthetic_checkpoint(conv, CHANNEL)
    w, b, names = objectives.target_filters(conv, CHANNEL, sd)
    m, q = spectrum(size)
    net = render.ModelInput(model, conv)
    render.visualize(net, w, b, 0, render.Maco(m, q, size, 1, crops, progress=False))  # warm-up
    t = time.perf_counter()
    render.visualize(net, w, b, 0, render.Maco(m, q, size, steps, crops, progress=False))
    ours = time.perf_counter() - t
    dnet = disentangle.disentangled_model(model, layer, CHANNEL, sd)
    c_out = conv.out_channels
    runs = [(model, conv, CHANNEL), (dnet, dnet.get_submodule(layer)[0], CHANNEL),
            (dnet, dnet.get_submodule(layer)[0], c_out)]
    separate_run(model, conv, CHANNEL, m, q, size, 1, crops, 0)  # warm-up
    t = time.perf_counter()
    for i, (net, hooked, row) in enumerate(runs):
        separate_run(net, hooked, row, m, q, size, steps, crops, i)
    sep = time.perf_counter() - t
    n = len(names)
    return {"model": name, "layer": layer, "targets": n, "size": size, "steps": steps, "crops": crops,
            "ours_s": round(ours, 3), "ours_s_per_step": round(ours / steps, 4), "ours_s_per_vis": round(ours / n, 3),
            "separate_s": round(sep, 3), "separate_s_per_step": round(sep / steps, 4),
            "separate_s_per_vis": round(sep / n, 3), "ratio": round(sep / ours, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--crops", type=int, default=4, help="crops of each image per step")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--models", nargs="+", default=["demo", "resnet50"], choices=["demo", "resnet50"])
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    rows = []
    print(f"CPU, {torch.get_num_threads()} threads; S = {args.size}, {args.steps} steps, {args.crops} crops per "
          f"image per step; 3 targets (original, D1, D2)")
    print("| model | layer | ours s/step | ours s/vis | separate s/step | separate s/vis | separate / ours |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, model, layer in workloads(args.models):
        r = bench(name, model, layer, args.size, args.steps, args.crops)
        rows.append(r)
        print(f"| {r['model']} | {r['layer']} | {r['ours_s_per_step']:.3f} | {r['ours_s_per_vis']:.2f} | "
              f"{r['separate_s_per_step']:.3f} | {r['separate_s_per_vis']:.2f} | {r['ratio']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
