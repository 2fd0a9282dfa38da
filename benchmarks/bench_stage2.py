"""Stage 2 benchmark: histograms, used classes and the cosines of the class ARVs of every channel.

ours:      chunked reads of the store's arrays; ARVs in closed form from the class means of the patch sums.
published: the published script's algorithm: three torch.load per image of the published stage-1 files
           (each loading its whole batch's storage), the class histograms counted channel by channel in
           Python, then for every channel used by at least two classes and each of its used classes: a
           fresh ImageFolder subset and an 8-worker DataLoader over the class's train images, a forward
           pass of the whole network (image requiring grad, parameters in their default state, so the
           whole graph is recorded) and a backward through a copy of the layer to its input; per-image
           ARVs cast to float16, averaged in float16, cosines in float16 with numpy; the pickles and the
           table it writes.
naive:     (extra row) reload the naive stage-1 .pt files, one forward and backward pass per used
           (channel, class) pair.

  python -m benchmarks.bench_stage2 [--workdir DIR] [workload flags, see --help]
"""
import os

from benchmarks import bench_stage1, measure, published_code, workload

MODULE = "benchmarks.bench_stage2"  # run as python -m MODULE (its children too)


def ours(wl, workdir, timer):
    from utils.method import similarities
    from utils.stages import stage2_passes
    model, conv = workload.build_model()
    w = conv.weight.detach()
    for _ in timer.runs():
        with timer:
            st = bench_stage1.open_store(workdir)
            hist = stage2_passes.class_histogram(st["attributions"], st["targets"], wl.classes, wl.tau)
            used = similarities.used_classes(hist, similarities.class_counts(st["targets"], wl.classes), workload.P_USE)
            means = stage2_passes.class_mean_patch_sums(st["patch_sums"], st["targets"], wl.classes)
            cands = similarities.candidate_pairs(w, means, used, workload.COS_LOW, workload.COS_HIGH)
    multi = used.sum(dim=0) >= 2
    return {"used_pairs": int(used.sum()), "arv_pairs": int(used[:, multi].sum()), "candidates": cands}


def published_dir(workdir):
    return os.path.join(workdir, "store_published", "results_get_cosine_similarities")


def published_arv_pickle(workdir):
    return os.path.join(published_dir(workdir),
                        "bench_resnet50_importance_vectors_for_all_channels_and_corresponding_important_classes_unnormalized.pkl")


class PublishedImportances:
    """The published stage 2's dataset over the stage-1 files: three torch.load per image."""

    def __init__(self, folder, n):
        self.folder, self.n = folder, n

    def __len__(self):
        return self.n  # the published code returns ImageNet's 1281167 here

    def __getitem__(self, i):
        import torch
        f = lambda what: bench_stage1.published_file(self.folder, i, what)  # noqa: E731
        return {"target": torch.load(f("target")), "prediction": torch.load(f("prediction")),
                "channel_importance_layer_wrt_class": torch.load(f("channel_importance_layer_wrt_class")),
                "channel_importance_before_layer_wrt_each_channel": 0}


def published_class_arv(wl, model, layer_copy, kept, train_dir, c, y, batch_size, workers):
    """The published ARV of channel c for class y: (1, C_in) float16, the float16 mean of float16 per-image
    ARVs. ``kept``: the published forward hooks on the layer (its input as ``x``); ``layer_copy``: the
    layer of a deep copy of the model."""
    import torch
    loader = torch.utils.data.DataLoader(published_code.subset(wl, train_dir, [y]), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    per_image = []
    for images, targets in loader:
        images.requires_grad = True
        model(images)
        x = kept["x"].clone()
        x.requires_grad = True
        a = layer_copy(x).sum(dim=(2, 3))
        target_outputs = torch.gather(a, 1, torch.full_like(targets, c).unsqueeze(-1))
        (grad,) = torch.autograd.grad(torch.unbind(target_outputs), x)
        per_image.append((grad * x).sum(dim=(2, 3)).to(torch.float16).detach())
    return torch.cat(per_image, dim=0).mean(dim=0, keepdim=True)


def published_stage2(wl, model, conv, workdir, num_classes, tau, p, low, high, batch_size, workers):
    """The published stage 2 on the CPU (algorithm of its get_cosine_similarities.py; its 1000 classes
    and ImageNet's image count patched to the workload's). Returns (pairs whose ARVs it computed, list)."""
    import copy
    import pickle

    import numpy as np
    import torch
    out = published_dir(workdir)
    os.makedirs(out, exist_ok=True)
    train_dir = os.path.join(workload.data_root(workdir), "train")
    n_images = wl.train_images
    c_out = conv.out_channels

    hist = [[0] * c_out for _ in range(num_classes)]
    loader = torch.utils.data.DataLoader(PublishedImportances(bench_stage1.published_folder(workdir), n_images),
                                         batch_size=1024 * 16, shuffle=False, num_workers=0)
    for sample in loader:
        targets = sample["target"]
        A = sample["channel_importance_layer_wrt_class"]
        assert A.shape[1] == c_out
        required = torch.clamp(A, min=0.0).sum(dim=1) * tau
        important = (A >= required.unsqueeze(-1)).int()
        for y in torch.unique(targets):
            counts = important[targets == y, :].sum(dim=0)
            for c in range(c_out):
                hist[y][c] += counts[c].item()
    with open(os.path.join(out, f"bench_resnet50_required{tau}_class_histograms.pkl"), "wb") as fp:
        pickle.dump(hist, fp)
    channel_hist = [[hist[y][c] for y in range(num_classes)] for c in range(c_out)]
    per_class = published_code.class_counts(train_dir)
    classes_for_channel = [[y for y in range(num_classes) if channel_hist[c][y] >= p * per_class[y]]
                           for c in range(c_out)]

    model_copy = copy.deepcopy(model).eval()
    layer_copy = model_copy.get_submodule(workload.LAYER)
    kept, handles = published_code.hooks(conv, want_input=True, want_output=True, want_grad=True)
    arvs, pairs = {}, 0
    for c in range(c_out):
        ys = classes_for_channel[c]
        if len(ys) < 2:
            continue
        arvs[c] = {}
        for y in ys:
            arvs[c][y] = published_class_arv(wl, model, layer_copy, kept, train_dir, c, y, batch_size, workers)
            pairs += 1
    for h in handles:
        h.remove()
    with open(published_arv_pickle(workdir), "wb") as fp:
        pickle.dump(arvs, fp)

    def cos(a, b):
        a, b = a.numpy(), b.numpy()
        return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))

    final = []
    with np.errstate(all="ignore"):
        for c in range(c_out):
            ys = classes_for_channel[c]
            if len(ys) < 2:
                continue
            for i in range(len(ys) - 1):
                for j in range(i + 1, len(ys)):
                    final.append({"channel": c, "class1": ys[i], "class2": ys[j],
                                  "cosine_similarity": cos(arvs[c][ys[i]][0], arvs[c][ys[j]][0])})
    final = sorted(final, key=lambda d: d["cosine_similarity"], reverse=True)
    below = [d for d in final if low <= d["cosine_similarity"] < high]
    lines = "Channel,Class1,Class2,CosineSimilarity\n" + "".join(
        f"{d['channel']},{d['class1']},{d['class2']},{d['cosine_similarity']}\n" for d in below)
    with open(os.path.join(out, f"bench_resnet50_required{tau}_p{p}_cossim{low}to{high}.txt"), "w") as f:
        f.write(lines)
    as_float = lambda ds: [dict(d, cosine_similarity=float(d["cosine_similarity"])) for d in ds]  # noqa: E731
    return pairs, as_float(below), as_float(final)


def published(wl, workdir, timer):
    import shutil
    model, conv = workload.build_model(requires_grad=True)
    for _ in timer.runs():
        shutil.rmtree(published_dir(workdir), ignore_errors=True)  # its caches would skip the work
        with timer:
            pairs, cands, before_window = published_stage2(
                wl, model, conv, workdir, wl.classes, wl.tau, workload.P_USE, workload.COS_LOW, workload.COS_HIGH,
                wl.batch_size, wl.workers_published(workload.PUBLISHED_WORKERS))
    return {"arv_pairs": pairs, "candidates": cands, "class_pairs": len(before_window),
            "before_window": before_window}


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


def naive(wl, workdir, timer):
    import torch
    from torch.utils.data import DataLoader
    model, conv = workload.build_model()
    ds = wl.dataset(workdir, "train")
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
            important = A >= wl.tau * A.clamp_min(0).sum(dim=1, keepdim=True)
            used = []  # (channel, class)
            for y in range(wl.classes):
                n_y = int((targets == y).sum())
                counts = important[targets == y].sum(dim=0)
                used += [(c, y) for c in torch.nonzero(counts >= workload.P_USE * n_y).flatten().tolist() if n_y]
            arvs = {}
            for c, y in used:
                rows = [i for i in range(len(ds)) if ds.targets[i] == y]
                total, count = 0, 0
                for images, _ in DataLoader(torch.utils.data.Subset(ds, rows), batch_size=wl.batch_size):
                    s, k = naive_arv(model, conv, images, c)
                    total, count = total + s, count + k
                arvs[(c, y)] = total / count
            cands = []
            for c in sorted({c for c, _ in used}):
                ys = sorted(y for cc, y in used if cc == c)
                for i, y1 in enumerate(ys):
                    for y2 in ys[i + 1:]:
                        cos = float(torch.nn.functional.cosine_similarity(arvs[(c, y1)], arvs[(c, y2)], dim=0))
                        if workload.COS_LOW <= cos < workload.COS_HIGH:
                            cands.append({"channel": c, "class1": y1, "class2": y2, "cosine_similarity": cos})
            cands.sort(key=lambda d: -d["cosine_similarity"])
    return {"used_pairs": len(used), "candidates": cands}


def check(o, other):
    """Candidates (channel, class1, class2) of ours and another implementation, and their cosines."""
    import math
    key = lambda d: (d["channel"], d["class1"], d["class2"])  # noqa: E731
    a = {key(d): d["cosine_similarity"] for d in o["candidates"]}
    b = {key(d): d["cosine_similarity"] for d in other["candidates"]}
    both = set(a) & set(b)
    return {"candidates_ours": len(a), "candidates_other": len(b), "candidates_common": len(both),
            "nan_other": sum(1 for v in b.values() if math.isnan(v)),
            "max_cos_diff": max((abs(a[k] - b[k]) for k in both if not math.isnan(b[k])), default=0.0)}


def check_published_arvs(wl, workdir, ours_candidates):
    """The published ARVs (float16, from its pickle) against ours (closed form from the store), and the
    cosines of its ARVs taken in float64 against ours: what its list would be without the float16 cosine."""
    import pickle
    model, conv = workload.build_model()
    with open(published_arv_pickle(workdir), "rb") as fp:
        arvs = pickle.load(fp)
    rel, norms = [], []
    for c, per_class in arvs.items():
        for y, v in per_class.items():
            ours = concept_arvs(workdir, conv, c, [y], [y])[0].double()
            theirs = v[0].double()
            rel.append(float((theirs - ours).abs().max() / ours.abs().max()))
            norms.append(float(ours.norm()))
    ours_cos = {(d["channel"], d["class1"], d["class2"]): d["cosine_similarity"] for d in ours_candidates}
    diffs = []
    for (c, y1, y2), cos in ours_cos.items():
        if c in arvs and y1 in arvs[c] and y2 in arvs[c]:
            a, b = arvs[c][y1][0].double(), arvs[c][y2][0].double()
            diffs.append(abs(float(a @ b / (a.norm() * b.norm())) - cos))
    return {"arv_max_rel_diff": max(rel, default=0.0), "arv_norm_max": max(norms, default=0.0),
            "arv_norms_over_256": int(sum(n > 256 for n in norms)), "arvs": len(rel),
            "max_cos_diff_float64": max(diffs, default=0.0), "cos_compared": len(diffs)}


def concept_arvs(workdir, conv, c, s1, s2):
    """v1, v2: ARVs of channel c for the two concepts, in closed form from the store."""
    import numpy as np

    from utils.method import similarities
    st = bench_stage1.open_store(workdir)
    targets = np.asarray(st["targets"])
    w = conv.weight[c].detach()
    return [similarities.arv(w, similarities.rows_mean_patch_sums(st["patch_sums"],
                                                                   np.flatnonzero(np.isin(targets, s)))).float()
            for s in (s1, s2)]


def ensure_published_stage2(wl, workdir):
    """The published stage 2's ARV pickle (untimed), which the published stage 3 reads."""
    bench_stage1.ensure_stage1(wl, workdir)
    if not os.path.isfile(published_arv_pickle(workdir)):
        measure.run_child(MODULE, "published", workdir)


def run(wl, workdir):
    import math
    bench_stage1.ensure_stage1(wl, workdir)
    row = measure.compare(wl, "2", MODULE, workdir, "{ours[used_pairs]} used (channel, class) pairs, "
                         "{ours[arv_pairs]} of them in channels used by 2+ classes (published: one fwd+bwd pass "
                         "over the class's images for each of these)", check)
    row["used_pairs"], row["arv_pairs"] = row["ours"]["used_pairs"], row["ours"]["arv_pairs"]
    pc = row["published_check"]
    before = row["published"]["before_window"]
    pc["published_pairs_before_window"] = len(before)
    pc["published_nan_before_window"] = sum(1 for d in before if not math.isfinite(d["cosine_similarity"]))
    pc.update(check_published_arvs(wl, workdir, row["ours"]["candidates"]))
    print(f"       tau={wl.tau}, p={workload.P_USE}: ARV pairs ours {row['arv_pairs']}, published "
          f"{row['published']['arv_pairs']}; candidates ours {pc['candidates_ours']}, published "
          f"{pc['candidates_other']} ({len(before)} before its cosine window, {pc['published_nan_before_window']} "
          f"of them NaN/inf), in both {pc['candidates_common']}, max |cos difference| {pc['max_cos_diff']:.2g} "
          f"(published: float16)")
    print(f"       published ARVs vs ours: max relative difference {pc['arv_max_rel_diff']:.2g} over {pc['arvs']} "
          f"ARVs (float16 rounding); {pc['arv_norms_over_256']} have a norm above 256 (max {pc['arv_norm_max']:.0f}), "
          f"where the float16 cosine overflows; cosines of its ARVs in float64 vs ours: max difference "
          f"{pc['max_cos_diff_float64']:.2g} over {pc['cos_compared']} pairs")
    if "naive_check" in row:
        nc = row["naive_check"]
        print(f"       naive: {row['naive']['used_pairs']} ARV passes, candidates {nc['candidates_other']}, in both "
              f"{nc['candidates_common']}, max |cos difference| {nc['max_cos_diff']:.2g}")
    return row


def main(argv=None):
    return measure.main({"ours": ours, "published": published, "naive": naive}, run, __doc__, argv)


if __name__ == "__main__":
    main()
