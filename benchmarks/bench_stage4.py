"""Stage 4 benchmark: per-image numbers on the val images of both concepts (relative attribution of the
channel, spatial sums of the original channel and of D1, D2, R), from the same checkpoint on both sides.

ours:      one forward pass to the logits with the head-only backward; D1, D2, R are the three checkpoint
           filters applied to the layer's input.
published: the published script's algorithm: the checkpoint loaded into its small module, a deep copy of
           the network with the layer replaced by the split layer and the merging 1x1 conv (identity built
           element by element); per concept a fresh ImageFolder subset, batches of 64, the whole original
           network with the image requiring grad (parameters in their default state) and autograd.grad
           back to the image (the layer's gradient caught by a module backward hook), then the whole
           disentangled network on the same images.
naive:     (extra row) the original network (graph down to the image, frozen parameters) for the
           relative attribution, then the whole disentangled network for D1, D2, R.

  python -m benchmarks.bench_stage4 [--workdir DIR] [workload flags, see --help]
"""
import os

from benchmarks import bench_stage1, bench_stage2, bench_stage3, measure, published_code, workload

MODULE = "benchmarks.bench_stage4"  # run as python -m MODULE (its children too)

RHO = 0.5


def setup(wl, workdir):
    from utils.data import folders
    from utils.method import split
    model, conv = workload.build_model()
    c, s1, s2 = bench_stage3.pick_concepts(wl, workdir)
    v1, v2 = bench_stage2.concept_arvs(workdir, conv, c, s1, s2)
    sd = split.checkpoint_state_dict(split.split_filter(conv.weight[c].detach(), v1, v2, RHO))
    ds = wl.dataset(workdir, "val")
    return model, conv, c, sd, ds, folders.indices_of_classes(ds, s1 + s2)


def ours(wl, workdir, timer):
    import torch

    from utils.data.scan import ScanPlan
    from utils.stages import stage4
    model, conv, c, sd, ds, indices = setup(wl, workdir)
    path = checkpoint_path(workdir, sd)
    for _ in timer.runs():
        with timer:
            filters, bias = stage4.checkpoint_filters(torch.load(path))
            plan = ScanPlan(ds, wl.batch_size, "cpu", wl.workers_ours())
            (r,) = stage4.evaluate_many(model, conv, [(c, filters, bias, {ds.targets[i] for i in indices})], plan,
                                        indices)
    return {"channel": c, "images": len(indices), "rel": r["rel"].tolist(), "orig": r["orig"].tolist(),
            "maps": r["maps"].tolist()}


def checkpoint_path(workdir, sd):
    """The stage-4 checkpoint (split at RHO with our ARVs) as a file, which the published side loads."""
    import torch
    path = os.path.join(workdir, f"stage4_checkpoint_f{RHO}.pth")
    torch.save(sd, path)
    return path


def published_stage4(wl, model, conv, c, path, val_dir, classes1, classes2):
    """The published stage 4 on the CPU (algorithm of its get_results.py, without the plots and tables):
    per-image rel, orig and (D1, D2, R) sums in the order concept 1's images, then concept 2's."""
    import copy

    import torch
    import torch.nn as nn
    c_out, c_in, k, _ = conv.weight.shape
    dmodel = copy.deepcopy(model).eval()
    small = bench_stage3.three_filter_module(c_in, k)
    small.load_state_dict(torch.load(path))
    seq = nn.Sequential(nn.Conv2d(c_in, c_out + 2, kernel_size=k, stride=1, bias=False),
                        nn.Conv2d(c_out + 2, c_out, kernel_size=1, stride=1, bias=False))
    w = conv.weight.clone()
    w[c] = small.disentangled.weight[0].clone()
    w = torch.cat([w, small.disentangled.weight[1:2].clone()], dim=0)
    w = torch.cat([w, small.disentangled.weight[2:3].clone()], dim=0)
    seq[0].weight = nn.Parameter(w)
    identity = torch.zeros((c_out, c_out + 2, 1, 1))
    for i in range(c_out):
        identity[i, i, 0, 0] = 1.0
    identity[c, c_out, 0, 0] = 1.0
    identity[c, c_out + 1, 0, 0] = -1.0
    seq[1].weight = nn.Parameter(identity)
    parent, attr = workload.LAYER.rsplit(".", 1)
    setattr(dmodel.get_submodule(parent), attr, seq)
    kept, handles = published_code.hooks(conv, want_output=True, want_grad=True)
    kept_d, handles_d = published_code.hooks(seq[0], want_output=True, want_grad=True)
    rel, orig, maps = [], [], []
    for classes in (classes1, classes2):
        loader = torch.utils.data.DataLoader(published_code.subset(wl, val_dir, classes),
                                             batch_size=workload.PUBLISHED_BATCH_STAGE4, shuffle=False,
                                             num_workers=wl.workers_published(0))
        for images, targets in loader:
            images.requires_grad = True
            outputs = model(images)
            target_outputs = torch.gather(outputs, 1, targets.unsqueeze(-1))
            torch.autograd.grad(torch.unbind(target_outputs), images)
            att = torch.clamp(kept["a"] * kept["g"], min=0.0).sum(dim=(2, 3))
            rel.append((att[:, c] / att.sum(dim=1)).detach().cpu().numpy())
            orig.append(kept["a"].sum(dim=(2, 3))[:, c].detach().cpu().numpy())
            outputs_disentangled = dmodel(images)  # noqa: F841  (kept, with its graph, as published)
            d = kept_d["a"].sum(dim=(2, 3))
            maps.append(torch.stack([d[:, c], d[:, c_out], d[:, c_out + 1]], dim=1).detach().cpu().numpy())
    for h in handles + handles_d:
        h.remove()
    import numpy as np
    return np.concatenate(rel), np.concatenate(orig), np.concatenate(maps)


def published(wl, workdir, timer):
    model, conv = workload.build_model(requires_grad=True)
    c, s1, s2 = bench_stage3.pick_concepts(wl, workdir)
    v1, v2 = bench_stage2.concept_arvs(workdir, conv, c, s1, s2)
    from utils.method import split
    sd = split.checkpoint_state_dict(split.split_filter(conv.weight[c].detach(), v1, v2, RHO))
    path = checkpoint_path(workdir, sd)
    val_dir = os.path.join(workload.data_root(workdir), "val")
    for _ in timer.runs():
        with timer:
            rel, orig, maps = published_stage4(wl, model, conv, c, path, val_dir, s1, s2)
    return {"channel": c, "images": len(rel), "rel": rel.tolist(), "orig": orig.tolist(), "maps": maps.tolist()}


def naive(wl, workdir, timer):
    import torch

    from utils.data import folders
    from utils import disentangle
    model, conv, c, sd, ds, indices = setup(wl, workdir)
    c_out = conv.out_channels
    dmodel = disentangle.disentangled_model(model, workload.LAYER, c, sd)
    split = dmodel.get_submodule(workload.LAYER)[0]
    for _ in timer.runs():
        rel, orig, maps = [], [], []
        with timer:
            loader = folders.make_loader(ds, folders.batches_of(indices, wl.batch_size), 0, "cpu")
            for images, labels in loader:
                # the original network with its autograd graph down to the image, as captum's
                # LayerGradientXActivation builds it; the gradient is taken at the layer's output only
                kept = {}
                h = conv.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
                images = images.clone().requires_grad_(True)
                logits = model(images)
                h.remove()
                a = kept["a"]
                (g,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), a)
                pos = (a * g).clamp_min(0).sum(dim=(2, 3)).detach()
                rel.append(pos[:, c] / pos.sum(dim=1))
                orig.append(a[:, c].detach().sum(dim=(1, 2)))
                # the whole disentangled network for D1, D2, R
                out = {}
                h = split.register_forward_hook(lambda m, i, o: out.__setitem__("maps", o))
                with torch.no_grad():
                    dmodel(images.detach())
                h.remove()
                d = out["maps"]
                maps.append(torch.stack([d[:, c], d[:, c_out], d[:, c_out + 1]], dim=1).sum(dim=(2, 3)))
    return {"channel": c, "images": len(indices), "rel": torch.cat(rel).tolist(), "orig": torch.cat(orig).tolist(),
            "maps": torch.cat(maps).tolist()}


def check(o, other):
    import numpy as np
    diffs = {}
    for k in ("rel", "orig", "maps"):
        a, b = np.array(o[k]), np.array(other[k])
        diffs[k] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.shape == b.shape else float("inf")
    return {"max_rel_diff": max(diffs.values()), "diffs": diffs, "same_images": o["images"] == other["images"]}


def run(wl, workdir):
    bench_stage1.ensure_stage1(wl, workdir)
    row = measure.compare(wl, "4", MODULE, workdir, "rel. attribution, orig/D1/D2/R sums of {ours[images]} val images "
                         "of channel {ours[channel]} (published: the whole original network with backward to "
                         "the image, and the whole disentangled network)", check)
    row.update(channel=row["ours"]["channel"], images=row["ours"]["images"])
    pc = row["published_check"]
    print(f"       check vs published: same images {pc['same_images']}, max relative difference of the numbers "
          f"{pc['max_rel_diff']:.2g} (rel {pc['diffs']['rel']:.2g}, orig {pc['diffs']['orig']:.2g}, "
          f"D1/D2/R {pc['diffs']['maps']:.2g})")
    if "naive_check" in row:
        print(f"       check vs naive: max relative difference {row['naive_check']['max_rel_diff']:.2g}")
    return row


def main(argv=None):
    return measure.main({"ours": ours, "published": published, "naive": naive}, run, __doc__, argv)


if __name__ == "__main__":
    main()
