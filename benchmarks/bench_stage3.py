"""Stage 3 benchmark: the best-rho scores of all 20 rho for one channel and two concepts.

ours:  one pass over the concepts' train images up to the layer's input, all 60 filters (D1, D2, R of
       the 20 rho) as one convolution.
naive: the published way: 20 evaluations, one per rho, each running the whole disentangled network
       over the images and reading D1 and D2 at the split layer.

  python benchmarks/bench_stage3.py [--workdir DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def setup(workdir):
    from utils import data
    model, conv = common.build_model()
    c, s1, s2 = common.pick_concepts(workdir)
    v1, v2 = common.concept_arvs(workdir, conv, c, s1, s2)
    ds = common.dataset(workdir, "train")
    indices = data.indices_of_classes(ds, s1 + s2)
    return model, conv, c, s1, s2, v1, v2, ds, indices


def ours(workdir, timer):
    import torch

    from utils import data, disentangle
    model, conv, c, s1, s2, v1, v2, ds, indices = setup(workdir)
    for _ in timer.runs():
        with timer:
            filters = disentangle.split_filters(conv.weight[c].detach(), v1, v2)
            loader = data.make_loader(ds, data.batches_of(indices, common.BATCH_SIZE), 0, "cpu")
            scores = disentangle.score_all_rhos(model, conv, filters, None, loader, s1, s2, torch.device("cpu"))
    return {"channel": c, "classes": [s1, s2], "images": len(indices), "scores": scores.tolist()}


def naive(workdir, timer):
    import torch

    from utils import data, disentangle
    model, conv, c, s1, s2, v1, v2, ds, indices = setup(workdir)
    c_out = conv.out_channels
    for _ in timer.runs(1):  # dozens of passes: one-off costs are amortized already
        with timer:
            scores = []
            for rho in disentangle.RHOS:
                sd = disentangle.checkpoint_state_dict(disentangle.split_filter(conv.weight[c].detach(), v1, v2, rho))
                dmodel = disentangle.disentangled_model(model, common.LAYER, c, sd)
                split = dmodel.get_submodule(common.LAYER)[0]
                kept = {}
                h = split.register_forward_hook(lambda m, i, o: kept.__setitem__("maps", o))
                sums, counts = {1: 0.0, 2: 0}, {1: 0, 2: 0}
                sums[2] = 0.0
                loader = data.make_loader(ds, data.batches_of(indices, common.BATCH_SIZE), 0, "cpu")
                with torch.no_grad():
                    for images, labels in loader:
                        dmodel(images)
                        maps = kept["maps"]
                        p1 = maps[:, c].clamp_min(0).sum(dim=(1, 2)).double()
                        p2 = maps[:, c_out].clamp_min(0).sum(dim=(1, 2)).double()
                        for i, y in enumerate(labels.tolist()):
                            if y in s1:
                                sums[1] += float(p1[i] / (p2[i] + disentangle.EPS))
                                counts[1] += 1
                            else:
                                sums[2] += float(p2[i] / (p1[i] + disentangle.EPS))
                                counts[2] += 1
                h.remove()
                scores.append(sums[1] / counts[1] + sums[2] / counts[2])
    return {"channel": c, "classes": [s1, s2], "images": len(indices), "scores": scores}


def run(workdir):
    common.ensure_stage1(workdir)

    def extra(o, n):
        import numpy as np
        a, b = np.array(o["scores"]), np.array(n["scores"])
        return {"channel": o["channel"], "concept_classes": o["classes"], "images": o["images"],
                "max_rel_score_diff": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
                "same_best_rho": int(np.argmax(a)) == int(np.argmax(b))}
    row = common.compare("3", __file__, workdir, "scores of the 20 rho, channel {channel}, {images} train images "
                         "(naive: 20 passes of the disentangled network)", extra)
    print(f"       channel {row['channel']}, concepts {row['concept_classes']}; max relative score difference "
          f"{row['max_rel_score_diff']:.2g}, same best rho: {row['same_best_rho']}")
    return row


if __name__ == "__main__":
    if not common.child_main({"ours": ours, "naive": naive}):
        common.standalone(run, __doc__)
