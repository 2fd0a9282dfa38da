"""Stage 3 benchmark: split one channel for all 20 rho, write the checkpoints, pick the best rho.

ours:      what disentangle_channel.py runs: the 20 splits, one pass over the concepts' train images (in
           batches of one class, channels-last) up to the layer's input with all 60 filters (D1, D2, R of
           the 20 rho) as one convolution, which also checks D1 + D2 - R against the layer's output on
           every image; both full networks' logits on 4 images; the 21 checkpoints.
published: the published script's algorithm: per rho, its ARV pickle loaded, the source sets found input
           channel by input channel, a deep copy of the whole network with the layer replaced by the
           split layer and the merging 1x1 conv (identity built element by element), the exactness check
           isclose(atol=1e-3) of both networks' logits on one random input, a small 3-filter module and
           its checkpoint; then one forward pass of the whole network per batch (batch 64 for concept 1,
           128 for concept 2, parameters in their default requires_grad state) with all 20 rho evaluated
           on the layer input caught by a hook; the best checkpoint. Its ARVs are the published stage 2's
           (float16, from its pickle).
naive:     (extra row) 20 passes over the images, one per rho, each running the whole disentangled
           network and reading D1 and D2 at the split layer.

  python -m benchmarks.bench_stage3 [--workdir DIR] [workload flags, see --help]
"""
import os

from benchmarks import bench_stage1, bench_stage2, measure, published_code, workload

MODULE = "benchmarks.bench_stage3"  # run as python -m MODULE (its children too)


EXACTNESS_IMAGES = 4  # disentangle_channel.py --exactness_images


def setup(wl, workdir):
    from utils.data import folders
    model, conv = workload.build_model()
    c, s1, s2 = pick_concepts(wl, workdir)
    v1, v2 = bench_stage2.concept_arvs(workdir, conv, c, s1, s2)
    ds = wl.dataset(workdir, "train")
    indices = folders.indices_of_classes(ds, s1 + s2)
    return model, conv, c, s1, s2, v1, v2, ds, indices


def ours(wl, workdir, timer):
    import shutil
    from types import SimpleNamespace

    import torch

    from utils import disentangle
    from utils.data import folders
    from utils.files import atomic, names
    from utils.method import rho_scores, split
    from utils.stages import stage3
    model, conv, c, s1, s2, v1, v2, ds, indices = setup(wl, workdir)
    ctx = SimpleNamespace(model=model, conv=conv, dataset=ds, device=torch.device("cpu"))
    settings = SimpleNamespace(batch_size=wl.batch_size, num_workers=wl.workers_ours(), channels_last=True)
    folder = os.path.join(workdir, "store_ours", "models_disentangled")
    for _ in timer.runs():
        shutil.rmtree(folder, ignore_errors=True)
        with timer:
            v1, v2 = bench_stage2.concept_arvs(workdir, conv, c, s1, s2)  # closed form, from the store
            filters = split.split_filters_k(conv.weight[c].detach(), torch.stack([v1, v2]))
            rows = [folders.indices_of_classes(ds, s1), folders.indices_of_classes(ds, s2)]
            found, = stage3.score_images(ctx, [rho_scores.Split(c, filters, None, rows)], indices, settings)
            scores = found.scores
            best = rho_scores.best_rho_index(scores)
            # the script's full-network check: both networks' logits on the first EXACTNESS_IMAGES images
            check = next(iter(folders.make_loader(ds, [indices[:EXACTNESS_IMAGES]], 0, "cpu")))[0]
            diff, zmax, _ = disentangle.network_check(model, workload.LAYER, c,
                                                      split.checkpoint_state_dict(filters[best]), check)
            assert split.within_tolerance(found.max_map_diff, found.max_abs_map)
            assert split.within_tolerance(diff, zmax)
            for r, rho in enumerate(split.RHOS + ["best"]):
                atomic.save_torch(os.path.join(folder, names.class_checkpoint("bench_resnet50", c, [s1, s2], rho)),
                                  split.checkpoint_state_dict(filters[best if rho == "best" else r]))
    return {"channel": c, "classes": [s1, s2], "images": len(indices), "scores": scores.tolist(),
            "best_rho": split.RHOS[best]}


def three_filter_module(c_in, kernel_size):
    """The published stage 3/4's small module: the three filters D1, D2, R as one conv and the merging
    1x1 conv [1, 1, -1]; calling it returns (merged, maps)."""
    import torch.nn as nn

    class ThreeFilters(nn.Module):
        def __init__(self):
            super().__init__()
            self.disentangled = nn.Conv2d(c_in, 3, kernel_size=kernel_size, stride=1, bias=False)
            self.merged = nn.Conv2d(3, 1, kernel_size=1, stride=1, bias=False)
            w = self.merged.weight.clone()
            w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0] = 1.0, 1.0, -1.0
            self.merged.weight = nn.Parameter(w)

        def forward(self, x):
            maps = self.disentangled(x)
            return self.merged(maps), maps

    return ThreeFilters()


def published_arvs(wl, workdir, model, conv, c, y1, y2):
    """(v1, v2, from_pickle): the published stage 2's float16 ARVs of (c, y1), (c, y2); when its pickle
    lacks the pair (the published histograms differ from ours at the threshold), the published ARV pass."""
    import copy
    import pickle

    bench_stage2.ensure_published_stage2(wl, workdir)
    with open(bench_stage2.published_arv_pickle(workdir), "rb") as fp:
        arvs = pickle.load(fp)
    if c in arvs and y1 in arvs[c] and y2 in arvs[c]:
        return arvs[c][y1][0], arvs[c][y2][0], True
    kept, handles = published_code.hooks(conv, want_input=True)
    layer_copy = copy.deepcopy(model).get_submodule(workload.LAYER)
    train_dir = os.path.join(workload.data_root(workdir), "train")
    v = [bench_stage2.published_class_arv(wl, model, layer_copy, kept, train_dir, c, y, wl.batch_size, 0)[0]
         for y in (y1, y2)]
    for h in handles:
        h.remove()
    return v[0], v[1], False


def published_stage3(wl, model, conv, workdir, c, y1, y2, pickle_path, batch_size):
    """The published stage 3 on the CPU (algorithm of its disentangle_channel.py). Returns the scores."""
    import copy
    import pickle

    import torch
    import torch.nn as nn

    from utils.method import split
    out = os.path.join(workdir, "store_published", "models_disentangled")
    os.makedirs(out, exist_ok=True)
    c_out, c_in, k, _ = conv.weight.shape
    name = lambda f: os.path.join(out, f"bench_resnet50_channel{c}_classes1{[y1]}_classes2{[y2]}_f{f}_unnormalized.pth")  # noqa: E731
    small = {}
    for f in split.RHOS:
        dmodel = copy.deepcopy(model).eval()
        seq = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=k, stride=1, bias=False),
                            nn.Conv2d(c_out, c_out, kernel_size=1, stride=1, bias=False))
        seq[0].weight = nn.Parameter(conv.weight.clone())
        identity = torch.zeros((c_out, c_out, 1, 1))
        for i in range(c_out):
            identity[i, i, 0, 0] = 1.0
        seq[1].weight = nn.Parameter(identity)
        parent, attr = workload.LAYER.rsplit(".", 1)
        setattr(dmodel.get_submodule(parent), attr, seq)
        with open(pickle_path, "rb") as fp:  # loaded again for every rho, as published
            v = pickle.load(fp)[c]
        v1, v2 = v[y1][0], v[y2][0]
        src1, src2 = [], []
        for i in range(v1.shape[0]):
            if v1[i] * f > v2[i]:
                src1.append(i)
            elif v2[i] * f > v1[i]:
                src2.append(i)
        # the split: row c = D1, row C_out = D2, row C_out + 1 = R; the merge adds D2 - R back into c
        w = seq[0].weight.clone()
        seq[0] = nn.Conv2d(c_in, c_out + 2, kernel_size=k, stride=1, padding=0, bias=False)
        new = torch.zeros((c_out + 2, c_in, k, k))
        new[:c_out] = w
        new[c_out] = w[c]
        new[c_out + 1] = w[c]
        new[c, src2] = 0.0
        new[c_out, src1] = 0.0
        new[c_out + 1, src1] = 0.0
        new[c_out + 1, src2] = 0.0
        seq[0].weight = nn.Parameter(new)
        m = seq[1].weight.clone()
        seq[1] = nn.Conv2d(c_out + 2, c_out, kernel_size=1, stride=1, bias=False)
        merge = torch.zeros((c_out, c_out + 2, 1, 1))
        merge[:, :c_out] = m
        merge[c, c_out] = 1.0
        merge[c, c_out + 1] = -1.0
        seq[1].weight = nn.Parameter(merge)
        x = torch.randn((1, 3, wl.crop, wl.crop))
        same = bool(torch.isclose(model(x), dmodel(x), atol=1e-03).all())
        assert same
        mod = three_filter_module(c_in, k)
        filt = torch.zeros((3, c_in, k, k))
        filt[0], filt[1], filt[2] = new[c], new[c_out], new[c_out + 1]
        mod.disentangled.weight = nn.Parameter(filt)
        torch.save(mod.state_dict(), name(f))
        small[f] = mod

    kept, handles = published_code.hooks(conv, want_input=True)
    train_dir = os.path.join(workload.data_root(workdir), "train")
    ratios = {}
    for concept, y, bs in ((1, y1, batch_size), (2, y2, workload.PUBLISHED_BATCH_CONCEPT2)):
        loader = torch.utils.data.DataLoader(published_code.subset(wl, train_dir, [y]), batch_size=bs, shuffle=False,
                                             num_workers=wl.workers_published(0))
        parts = {f: [] for f in split.RHOS}
        for images, targets in loader:
            _ = model(images)
            x = kept["x"]
            for f in split.RHOS:
                pos = torch.clamp(small[f](x)[1], min=0.0).sum(dim=(2, 3))
                num, den = (0, 1) if concept == 1 else (1, 0)
                parts[f].append((pos[:, num] / (pos[:, den] + 1e-5)).detach())
        ratios[concept] = {f: torch.cat(parts[f]).mean().item() for f in split.RHOS}
    for h in handles:
        h.remove()
    final = {f: ratios[1][f] + ratios[2][f] for f in split.RHOS}
    best = max(final, key=final.get)
    torch.save(small[best].state_dict(), name("_best"))
    return [final[f] for f in split.RHOS], best


def published(wl, workdir, timer):
    import shutil

    model, conv = workload.build_model(requires_grad=True)
    c, s1, s2 = pick_concepts(wl, workdir)
    v1, v2, from_pickle = published_arvs(wl, workdir, model, conv, c, s1[0], s2[0])
    pickle_path = bench_stage2.published_arv_pickle(workdir)
    if not from_pickle:  # add the pair to a copy of the pickle (untimed): the timed part reads it as published
        import pickle
        with open(pickle_path, "rb") as fp:
            arvs = pickle.load(fp)
        arvs.setdefault(c, {}).update({s1[0]: v1[None], s2[0]: v2[None]})
        pickle_path = os.path.join(workdir, "published_arvs_stage3.pkl")
        with open(pickle_path, "wb") as fp:
            pickle.dump(arvs, fp)
    folder = os.path.join(workdir, "store_published", "models_disentangled")
    ds = wl.dataset(workdir, "train")
    from utils.data import folders
    images = len(folders.indices_of_classes(ds, s1 + s2))
    for _ in timer.runs():
        shutil.rmtree(folder, ignore_errors=True)
        with timer:
            scores, best = published_stage3(wl, model, conv, workdir, c, s1[0], s2[0], pickle_path, wl.batch_size)
    return {"channel": c, "classes": [s1, s2], "images": images, "scores": scores, "best_rho": best,
            "arvs_from_published_stage2": from_pickle}


def naive(wl, workdir, timer):
    import torch

    from utils import disentangle
    from utils.data import folders
    from utils.method import rho_scores, split
    model, conv, c, s1, s2, v1, v2, ds, indices = setup(wl, workdir)
    c_out = conv.out_channels
    for _ in timer.runs(1):  # dozens of passes: one-off costs are amortized already
        with timer:
            scores = []
            for rho in split.RHOS:
                sd = split.checkpoint_state_dict(split.split_filter(conv.weight[c].detach(), v1, v2, rho))
                dmodel = disentangle.disentangled_model(model, workload.LAYER, c, sd)
                lp = dmodel.get_submodule(workload.LAYER)[0]
                kept = {}
                h = lp.register_forward_hook(lambda m, i, o: kept.__setitem__("maps", o))
                sums, counts = {1: 0.0, 2: 0}, {1: 0, 2: 0}
                sums[2] = 0.0
                loader = folders.make_loader(ds, folders.batches_of(indices, wl.batch_size), 0, "cpu")
                with torch.no_grad():
                    for images, labels in loader:
                        dmodel(images)
                        maps = kept["maps"]
                        p1 = maps[:, c].clamp_min(0).sum(dim=(1, 2)).double()
                        p2 = maps[:, c_out].clamp_min(0).sum(dim=(1, 2)).double()
                        for i, y in enumerate(labels.tolist()):
                            if y in s1:
                                sums[1] += float(p1[i] / (p2[i] + rho_scores.EPS))
                                counts[1] += 1
                            else:
                                sums[2] += float(p2[i] / (p1[i] + rho_scores.EPS))
                                counts[2] += 1
                h.remove()
                scores.append(sums[1] / counts[1] + sums[2] / counts[2])
    return {"channel": c, "classes": [s1, s2], "images": len(indices), "scores": scores}


def check(o, other):
    import numpy as np
    a, b = np.array(o["scores"]), np.array(other["scores"])
    return {"max_rel_score_diff": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
            "same_best_rho": int(np.argmax(a)) == int(np.argmax(b))}


def pick_concepts(wl, workdir):
    """Stage 3/4 workload, from our store at the workload's tau and P_USE: among the channels used by at least two
    classes (those whose ARVs the published stage 2 computes), the one whose two most frequent used
    classes are the most frequent overall, and those two classes as concept 1 and concept 2. Without such
    a channel: the same rule over all channels and classes."""
    import torch

    from utils.method import similarities
    from utils.stages import stage2_passes
    st = bench_stage1.open_store(workdir)
    hist = stage2_passes.class_histogram(st["attributions"], st["targets"], wl.classes, wl.tau).double()
    used = similarities.used_classes(hist, similarities.class_counts(st["targets"], wl.classes), workload.P_USE)
    masked = torch.where(used, hist, torch.full_like(hist, -1.0))
    if (used.sum(dim=0) >= 2).any():
        hist = masked
        hist[:, used.sum(dim=0) < 2] = -1.0
    top2 = torch.topk(hist, 2, dim=0)
    c = int(torch.argmax(top2.values.sum(dim=0)))
    y1, y2 = sorted(top2.indices[:, c].tolist())
    return c, [y1], [y2]


def run(wl, workdir):
    bench_stage2.ensure_published_stage2(wl, workdir)
    row = measure.compare(wl, "3", MODULE, workdir, "20 rho for channel {ours[channel]}, concepts {ours[classes]}, "
                         "{ours[images]} train images (published: a deep copy of the network per rho, one "
                         "full forward per batch)", check)
    row.update(channel=row["ours"]["channel"], concept_classes=row["ours"]["classes"], images=row["ours"]["images"])
    pc = row["published_check"]
    print(f"       check vs published: best rho ours {row['ours']['best_rho']}, published "
          f"{row['published']['best_rho']} (same: {pc['same_best_rho']}); max relative score difference "
          f"{pc['max_rel_score_diff']:.2g} (published: float16 ARVs"
          f"{'' if row['published']['arvs_from_published_stage2'] else ', computed for this pair'})")
    if "naive_check" in row:
        nc = row["naive_check"]
        print(f"       check vs naive: same best rho {nc['same_best_rho']}, max relative score difference "
              f"{nc['max_rel_score_diff']:.2g}")
    return row


def main(argv=None):
    return measure.main({"ours": ours, "published": published, "naive": naive}, run, __doc__, argv)


if __name__ == "__main__":
    main()
