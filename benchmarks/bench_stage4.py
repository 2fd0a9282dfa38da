"""Stage 4 benchmark: per-image numbers on the val images of both concepts (relative attribution of the
channel, spatial sums of the original channel and of D1, D2, R).

ours:  one forward pass to the logits with the head-only backward; D1, D2, R are the three checkpoint
       filters applied to the layer's input.
naive: the published way: the original network (autograd graph down to the image, as captum builds it)
       for the relative attribution, then the whole disentangled network for D1, D2, R.

  python benchmarks/bench_stage4.py [--workdir DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RHO = 0.5


def setup(workdir):
    from utils import data, disentangle
    model, conv = common.build_model()
    c, s1, s2 = common.pick_concepts(workdir)
    v1, v2 = common.concept_arvs(workdir, conv, c, s1, s2)
    sd = disentangle.checkpoint_state_dict(disentangle.split_filter(conv.weight[c].detach(), v1, v2, RHO))
    ds = common.dataset(workdir, "val")
    return model, conv, c, sd, ds, data.indices_of_classes(ds, s1 + s2)


def ours(workdir, timer):
    from utils import evaluation
    model, conv, c, sd, ds, indices = setup(workdir)
    for _ in timer.runs():
        with timer:
            filters, bias = evaluation.checkpoint_filters(sd)
            r = evaluation.evaluate(model, conv, c, filters, bias, ds, indices, common.BATCH_SIZE, "cpu", 0)
    return {"channel": c, "images": len(indices), "rel": r["rel"].tolist(), "orig": r["orig"].tolist(),
            "maps": r["maps"].tolist()}


def naive(workdir, timer):
    import torch

    from utils import data, disentangle
    model, conv, c, sd, ds, indices = setup(workdir)
    c_out = conv.out_channels
    dmodel = disentangle.disentangled_model(model, common.LAYER, c, sd)
    split = dmodel.get_submodule(common.LAYER)[0]
    for _ in timer.runs():
        rel, orig, maps = [], [], []
        with timer:
            loader = data.make_loader(ds, data.batches_of(indices, common.BATCH_SIZE), 0, "cpu")
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


def run(workdir):
    common.ensure_stage1(workdir)

    def extra(o, n):
        import numpy as np
        diffs = {}
        for k in ("rel", "orig", "maps"):
            a, b = np.array(o[k]), np.array(n[k])
            diffs[k] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        return {"channel": o["channel"], "images": o["images"], "max_rel_diff": max(diffs.values())}
    row = common.compare("4", __file__, workdir, "rel. attribution, orig/D1/D2/R sums of {images} val images "
                         "(naive: the original and the disentangled network)", extra)
    print(f"       max relative difference of the numbers: {row['max_rel_diff']:.2g}")
    return row


if __name__ == "__main__":
    if not common.child_main({"ours": ours, "naive": naive}):
        common.standalone(run, __doc__)
