"""Stage 2 benchmark: histograms, used classes and the cosines of the class ARVs of every channel.

ours:  chunked reads of the store's arrays; ARVs in closed form from the class means of the patch sums.
naive: the published way: reload the stage-1 .pt files one by one, then one forward and backward pass
       over the class's images per used (channel, class) pair to get the ARVs (gradient x input at the
       layer's input, cast to float16 per image as published), then the cosines.

  python benchmarks/bench_stage2.py [--workdir DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def ours(workdir, timer):
    from utils import similarities
    model, conv = common.build_model()
    w = conv.weight.detach()
    for _ in timer.runs():
        with timer:
            st = common.open_store(workdir)
            hist = similarities.class_histogram(st["attributions"], st["targets"], common.CLASSES, common.TAU)
            used = similarities.used_classes(hist, similarities.class_counts(st["targets"], common.CLASSES), common.P_USE)
            means = similarities.class_mean_patch_sums(st["patch_sums"], st["targets"], common.CLASSES)
            cands = similarities.candidate_pairs(w, means, used, common.COS_LOW, common.COS_HIGH)
    return {"used_pairs": int(used.sum()), "candidates": cands}


def naive_arv(model, conv, images, channel):
    """Mean over the images of the per-image ARVs of ``channel`` (float16 per image, as published),
    from one forward pass of the whole network and one backward pass to the layer's input."""
    import torch
    kept = {}

    def hook(module, inputs, output):
        kept["x"], kept["a"] = inputs[0], output

    images = images.clone().requires_grad_(True)
    h = conv.register_forward_hook(hook)
    model(images)
    h.remove()
    (g,) = torch.autograd.grad(kept["a"][:, channel].sum(), kept["x"])
    return (kept["x"] * g).sum(dim=(2, 3)).detach().half().float().sum(dim=0), len(images)


def naive(workdir, timer):
    import bench_stage1
    import torch
    from torch.utils.data import DataLoader
    model, conv = common.build_model()
    ds = common.dataset(workdir, "train")
    folder = bench_stage1.naive_folder(workdir)
    for _ in timer.runs(1):  # dozens of passes: one-off costs are amortized already
        with timer:
            n = len([f for f in os.listdir(folder) if f.endswith("_attributions.pt")])
            A, targets = [], []
            for i in range(n):
                A.append(torch.load(os.path.join(folder, f"{i:07d}_attributions.pt")).float())
                targets.append(int(torch.load(os.path.join(folder, f"{i:07d}_target.pt"))))
                torch.load(os.path.join(folder, f"{i:07d}_prediction.pt"))
            A, targets = torch.stack(A), torch.tensor(targets)
            important = A >= common.TAU * A.clamp_min(0).sum(dim=1, keepdim=True)
            used = []  # (channel, class)
            for y in range(common.CLASSES):
                n_y = int((targets == y).sum())
                counts = important[targets == y].sum(dim=0)
                used += [(c, y) for c in torch.nonzero(counts >= common.P_USE * n_y).flatten().tolist() if n_y]
            arvs = {}
            for c, y in used:
                rows = [i for i in range(len(ds)) if ds.targets[i] == y]
                total, count = 0, 0
                for images, _ in DataLoader(torch.utils.data.Subset(ds, rows), batch_size=common.BATCH_SIZE):
                    s, k = naive_arv(model, conv, images, c)
                    total, count = total + s, count + k
                arvs[(c, y)] = total / count
            cands = []
            for c in sorted({c for c, _ in used}):
                ys = sorted(y for cc, y in used if cc == c)
                for i, y1 in enumerate(ys):
                    for y2 in ys[i + 1:]:
                        cos = float(torch.nn.functional.cosine_similarity(arvs[(c, y1)], arvs[(c, y2)], dim=0))
                        if common.COS_LOW <= cos < common.COS_HIGH:
                            cands.append({"channel": c, "class1": y1, "class2": y2, "cosine_similarity": cos})
            cands.sort(key=lambda d: -d["cosine_similarity"])
    return {"used_pairs": len(used), "candidates": cands}


def run(workdir):
    common.ensure_stage1(workdir)

    def extra(o, n):
        key = lambda d: (d["channel"], d["class1"], d["class2"])  # noqa: E731
        a = {key(d): d["cosine_similarity"] for d in o["candidates"]}
        b = {key(d): d["cosine_similarity"] for d in n["candidates"]}
        both = set(a) & set(b)
        return {"used_pairs": o["used_pairs"], "candidates_ours": len(a), "candidates_naive": len(b),
                "candidates_common": len(both),
                "max_cos_diff": max((abs(a[k] - b[k]) for k in both), default=0.0)}
    row = common.compare("2", __file__, workdir, "{used_pairs} used (channel, class) pairs, cosines of class "
                         "ARVs (naive: reload .pt files, one fwd+bwd pass per pair)", extra)
    print(f"       {row['used_pairs']} used (channel, class) pairs at tau={common.TAU}, p={common.P_USE}; "
          f"candidates ours {row['candidates_ours']}, naive {row['candidates_naive']}, in both "
          f"{row['candidates_common']}, max |cos difference| {row['max_cos_diff']:.2g} (naive: float16 ARVs)")
    return row


if __name__ == "__main__":
    if not common.child_main({"ours": ours, "naive": naive}):
        common.standalone(run, __doc__)
