r"""Stage 2: gamma-polysemantic candidates (channel, class1, class2) from the store, without any model pass.

Example (the paper's values):
  python get_cosine_similarities.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --proportion_attribution_required 0.03 --p 0.75 --cos_sim_low 0 --cos_sim_high 0.5
"""
import argparse
import os

import numpy as np

from utils import cli, context, fileio, similarities, store


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p)
    p.add_argument("--proportion_attribution_required", type=float, default=0.05,
                   help="tau: channel c is important for an image if A[c] >= tau * sum of positive A (default 0.05)")
    p.add_argument("--p", type=float, default=0.75,
                   help="channel c uses class y if it is important for at least p * N_y images of y (default 0.75)")
    p.add_argument("--cos_sim_low", type=float, default=0.0, help="lowest cosine kept (inclusive, default 0)")
    p.add_argument("--cos_sim_high", type=float, default=1.0, help="cosine upper bound (exclusive, default 1)")
    p.add_argument("--out_dir", default=".",
                   help="folder for results_get_cosine_similarities/ (default: working directory, as published)")
    p.add_argument("--chunk_rows", type=int, default=similarities.DEFAULT_CHUNK_ROWS,
                   help="store rows read at a time (memory use)")
    args = p.parse_args()
    tau, pp, low, high = args.proportion_attribution_required, args.p, args.cos_sim_low, args.cos_sim_high

    ctx = context.setup(args, split="train")
    st = store.Store.open(store.store_folder(args.store_dir, ctx.tag), ctx.fingerprint)
    A, targets, P = st.array("attributions"), st.labels(), st.array("patch_sums")
    unreadable = st.unreadable_rows()
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    k = len(st.manifest["classes"])
    hist = similarities.class_histogram(A, targets, k, tau, args.chunk_rows, progress=True)
    counts = similarities.class_counts(targets, k)
    used = similarities.used_classes(hist, counts, pp)
    means = similarities.class_mean_patch_sums(P, targets, k, args.chunk_rows, progress=True)
    cands = similarities.candidate_pairs(ctx.conv.weight.detach(), means, used, low, high, progress=True)

    shown = [dict(d, cosine_similarity=round(d["cosine_similarity"], 4)) for d in cands]
    print(shown)
    print(f"{len(cands)} candidates (channel, class1, class2) with {low} <= cosine < {high}; "
          f"{len(similarities.polysemantic_channels(used))} channels use two or more classes "
          f"(tau={tau}, p={pp})")

    name = f"{ctx.tag}_required{tau}_p{pp}_cossim{low}to{high}"
    table = "Channel,Class1,Class2,CosineSimilarity\n" + "".join(
        f"{d['channel']},{d['class1']},{d['class2']},{d['cosine_similarity']:.4f}\n" for d in cands)
    out_txt = os.path.join(args.out_dir, "results_get_cosine_similarities", name + ".txt")
    fileio.write_text(out_txt, table)
    res = os.path.join(args.store_dir, "results_get_cosine_similarities")
    settings = {"proportion_attribution_required": tau, "p": pp, "cos_sim_low": low, "cos_sim_high": high,
                "model": ctx.model_spec, "layer": ctx.layer_path, "weights": ctx.weights_id}
    fileio.write_json(os.path.join(res, name + "_candidates.json"),
                      dict(settings, classes=st.manifest["classes"], candidates=cands))
    fileio.write_json(os.path.join(res, f"{ctx.tag}_required{tau}_histograms.json"),
                      dict(settings, images_per_class=counts.tolist(),
                           histogram_class_by_channel=hist.tolist()), indent=None)
    fileio.save_npy(os.path.join(res, f"{ctx.tag}_required{tau}_histograms.npy"), hist.numpy().astype(np.int32))
    print(f"wrote {out_txt} and {res}/{name}_candidates.json")


if __name__ == "__main__":
    cli.run(main)
