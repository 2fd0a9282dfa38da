r"""Stage 2: gamma-polysemantic candidates (channel, class1, class2) from the store, without any model pass.

Example (the paper's values):
  python get_cosine_similarities.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --proportion_attribution_required 0.03 --p 0.75 --cos_sim_low 0 --cos_sim_high 0.5

With --label_free it finds each channel's concepts without class labels instead (utils/stages/label_free.py):
its top --top_n training images by summed activation, k-means on their L1-normalised per-image ARVs,
k by silhouette over 2..5 (or --k); writes STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json:
  python get_cosine_similarities.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --label_free --channels 1660 522 --top_n 100

--importance_sign positive_activation counts an image for a channel only where the channel's summed
activation after the BatchNorm that follows the layer (ResNet: bn3 after conv3) is positive, computed
from the store's patch sums and the BatchNorm's parameters (no pass over the images), and prints how
many (channel, class) pairs the published rule counts only through images on which the layer's own
summed activation is negative. Its files carry the suffix _positive_activation.
"""
import os

import numpy as np
import torch

from utils.run import cli
from utils.stages import label_free
from utils.run import context
from utils.files import atomic
from utils.model import loading
from utils.method import similarities
from utils.files import store

TOP_SHOWN = 20  # candidates in the printed table (the files hold them all)


def blank(ctx):
    """A blank image of the transform's crop size: forwards of it find the BatchNorm and H' x W'."""
    return torch.zeros(1, 3, ctx.transform.crop, ctx.transform.crop)
SIGN_SUFFIX = {"published": "", "positive_activation": "_positive_activation"}  # in the names of the files written


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p)
    p.add_argument("--proportion_attribution_required", type=float, default=0.05,
                   help="tau: channel c is important for an image if A[c] >= tau * sum of positive A (default 0.05)")
    p.add_argument("--p", type=float, default=0.75,
                   help="channel c uses class y if it is important for at least p * N_y images of y (default 0.75)")
    p.add_argument("--cos_sim_low", type=float, default=0.0,
                   help="lowest cosine kept (inclusive, default 0; -1 <= low < high)")
    p.add_argument("--cos_sim_high", type=float, default=1.0, help="cosine upper bound (exclusive, default 1; at most 1)")
    p.add_argument("--out_dir", default=".",
                   help="folder for results_get_cosine_similarities/ (default: working directory, as published)")
    p.add_argument("--importance_sign", choices=tuple(SIGN_SUFFIX), default="published",
                   help="published (default): the rule above; positive_activation: an image counts for channel c "
                        "only where c's summed activation after the BatchNorm that follows the layer is positive "
                        "(the layer's own summed activation if no BatchNorm follows it; a note says so)")
    p.add_argument("--chunk_rows", type=int, default=similarities.DEFAULT_CHUNK_ROWS,
                   help="store rows read at a time (memory use)")
    g = p.add_argument_group("label-free concepts (instead of the candidate list)")
    g.add_argument("--label_free", action="store_true",
                   help="cluster each channel's top images by their per-image ARVs instead (no class labels used)")
    g.add_argument("--channels", nargs="+", default=None,
                   help="channels to study (space- or comma-separated; default: every channel of the layer)")
    g.add_argument("--top_n", type=int, default=100, help="top training images per channel (default 100)")
    g.add_argument("--k", default="auto",
                   help="concepts per channel: a number >= 2, or auto (by the silhouette over 2..5; default)")
    return p


def check_bounds(tau, pp, low, high):
    """Refuse thresholds outside their range (UserError, one line each): tau and p in (0, 1], -1 <= low < high <= 1."""
    if not 0 < tau <= 1:
        raise cli.UserError(f"--proportion_attribution_required {tau}: tau is a share of the positive attribution, "
                            f"in (0, 1] (the paper's 0.03 or 0.05)")
    if not 0 < pp <= 1:
        raise cli.UserError(f"--p {pp}: p is a share of a class's images, in (0, 1] (e.g. 0.75, not 75)")
    if not -1 <= low < high <= 1:
        raise cli.UserError(f"--cos_sim_low {low} --cos_sim_high {high}: a cosine lies in [-1, 1] and the range "
                            f"needs -1 <= low < high <= 1")


def candidate_table(cands, names, counts_of, top=TOP_SHOWN):
    """Lines of the strongest candidates, lowest cosine first: channel, both classes (name and index), cosine,
    and how many images of each class find the channel important. ``counts_of(channel, class)`` -> that number."""
    rows = sorted(cands, key=lambda d: (d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))[:top]
    if not rows:
        return []
    w1 = max(len(f"{names[d['class1']]} ({d['class1']})") for d in rows)
    w2 = max(len(f"{names[d['class2']]} ({d['class2']})") for d in rows)
    w1, w2 = max(w1, 7), max(w2, 7)
    lines = [f"{'channel':>7}  {'class 1':<{w1}}  {'class 2':<{w2}}  {'cosine':>7}  important for (images)"]
    for d in rows:
        c, y1, y2 = d["channel"], d["class1"], d["class2"]
        lines.append(f"{c:>7}  {f'{names[y1]} ({y1})':<{w1}}  {f'{names[y2]} ({y2})':<{w2}}  "
                     f"{d['cosine_similarity']:7.4f}  {counts_of(c, y1)} / "
                     f"{counts_of(c, y2)}")
    return lines


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "store_dir")
    if args.label_free:
        return run_label_free(args)
    tau, pp, low, high = args.proportion_attribution_required, args.p, args.cos_sim_low, args.cos_sim_high
    check_bounds(tau, pp, low, high)

    ctx = context.setup(args, split="train", store_flag="store_dir")
    st = context.open_store(args, ctx)
    A, targets, P = st.array("attributions"), st.labels(), st.array("patch_sums")
    unreadable = st.unreadable_rows()
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    k = len(st.manifest["classes"])
    counts = similarities.class_counts(targets, k)
    sign_report = {}
    if args.importance_sign == "published":
        hist = similarities.class_histogram(A, targets, k, tau, args.chunk_rows, progress=True)
    else:
        hist, sign_report = positive_activation_histogram(ctx, A, targets, P, k, tau, pp, counts, args.chunk_rows)
    used = similarities.used_classes(hist, counts, pp)
    means = similarities.class_mean_patch_sums(P, targets, k, args.chunk_rows, progress=True)
    cands = similarities.candidate_pairs(ctx.conv.weight.detach(), means, used, low, high, progress=True)

    names = st.manifest["classes"]
    table = candidate_table(cands, names, lambda c, y: f"{int(hist[y, c])} of {int(counts[y])}")
    if table:
        print(f"the {len(table) - 1} strongest candidates of layer '{ctx.layer_path}' (lowest cosine first; the "
              f"files list all of them):")
        print("\n".join(table))
    print(f"{len(cands)} candidates (channel, class1, class2) with {low} <= cosine < {high}; "
          f"{len(similarities.polysemantic_channels(used))} channels use two or more classes "
          f"(tau={tau}, p={pp})")

    suffix = SIGN_SUFFIX[args.importance_sign]
    name = f"{ctx.name}_required{tau}_p{pp}_cossim{low}to{high}{suffix}"
    table = "Channel,Class1,Class2,CosineSimilarity\n" + "".join(
        f"{d['channel']},{d['class1']},{d['class2']},{d['cosine_similarity']:.4f}\n" for d in cands)
    out_txt = os.path.join(args.out_dir, "results_get_cosine_similarities", name + ".txt")
    atomic.write_text(out_txt, table)
    res = os.path.join(args.store_dir, "results_get_cosine_similarities")
    settings = {"proportion_attribution_required": tau, "p": pp, "cos_sim_low": low, "cos_sim_high": high,
                "model": ctx.model_spec, "layer": ctx.layer_path, "weights": ctx.weights_id}
    if sign_report:  # published: the same files as before the flag existed
        settings.update(importance_sign=args.importance_sign, sign_report=sign_report)
    atomic.write_json(os.path.join(res, name + "_candidates.json"),
                      dict(settings, classes=st.manifest["classes"], candidates=cands))
    atomic.write_json(os.path.join(res, f"{ctx.name}_required{tau}_histograms{suffix}.json"),
                      dict(settings, images_per_class=counts.tolist(),
                           histogram_class_by_channel=hist.tolist()), indent=None)
    atomic.save_npy(os.path.join(res, f"{ctx.name}_required{tau}_histograms{suffix}.npy"),
                    hist.numpy().astype(np.int32))
    print(f"wrote {out_txt} and {res}/{name}_candidates.json")


def parse_k(value):
    """--k: None for auto, else an int >= 2."""
    if str(value).lower() == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise cli.UserError(f"--k {value}: give a number of concepts (2 or more) or auto")
    if k < 2:
        raise cli.UserError(f"--k {k}: a channel is split into at least 2 concepts; give 2 or more, or auto")
    return k


def parse_channels(values, ctx):
    """--channels: sorted distinct channel indices, each checked against the layer (None: all channels)."""
    if values is None:
        return list(range(ctx.conv.out_channels))
    out = set()
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                c = int(part)
            except ValueError:
                raise cli.UserError(f"--channels: '{part}' is not a channel index")
            context.check_channel(ctx, c, "--channels")
            out.add(c)
    if not out:
        raise cli.UserError("--channels: give at least one channel index")
    return sorted(out)


def run_label_free(args):
    """--label_free: concepts of each channel without class labels (utils/stages/label_free.py), from the store only."""
    k = parse_k(args.k)
    ctx = context.setup(args, split="train", store_flag="store_dir")
    channels = parse_channels(args.channels, ctx)
    st = context.open_store(args, ctx)
    labels = st.labels()
    usable = int((labels >= 0).sum())
    if usable < len(labels):
        print(f"{len(labels) - usable} unreadable training images recorded by stage 1 are never chosen")
    need = 3 if k is None else k + 1  # the silhouette needs more images than clusters
    if not need <= args.top_n <= usable:
        raise cli.UserError(f"--top_n {args.top_n}: give {need} to {usable} (the store has {usable} usable "
                            f"training images; {'--k auto' if k is None else f'--k {k}'} needs at least {need})")
    names = st.manifest["classes"]
    signs, positions, bn = label_free.layer_signs_and_positions(ctx.model, ctx.conv, blank(ctx))
    bias = None if ctx.conv.bias is None else ctx.conv.bias.detach()
    recs = label_free.discover(st.array("patch_sums"), labels, ctx.conv.weight.detach(), channels, names,
                             args.top_n, k, signs=signs, bias=bias, positions=positions,
                             chunk_rows=args.chunk_rows, progress=True)
    negative = [c for c in channels if recs[c]["sign"] < 0]
    note = (f"{len(negative)} of the {len(channels)} channels have sign -1: the BatchNorm {bn} after the layer has "
            f"a negative scale for them, so their top images are those with the most negative summed activation"
            if negative else "top images = largest summed activation (no BatchNorm with a negative scale follows "
                             "the layer for these channels)")
    for c in channels:
        print("\n".join(label_free.describe_channel(recs[c])))
    print(note)

    path = os.path.join(args.store_dir, "results_get_cosine_similarities", f"{ctx.name}_concepts_top{args.top_n}.json")
    doc = {"fingerprint": ctx.fingerprint, "top_n": args.top_n, "k": "auto" if k is None else k,
           "model": ctx.model_spec, "layer": ctx.layer_path, "seed": label_free.SEED, "n_init": label_free.N_INIT,
           "ks": list(label_free.AUTO_KS) if k is None else [k], "batchnorm": bn, "sign_note": note, "channels": {}}
    kept = 0
    if os.path.isfile(path):  # an earlier run with the same store and settings: keep its other channels
        try:
            old = atomic.read_json(path)
        except ValueError:
            old = {}
        same = all(old.get(key) == doc[key] for key in ("top_n", "k", "seed", "n_init", "layer")) and \
            isinstance(old.get("fingerprint"), dict) and \
            not store.describe_mismatch(old["fingerprint"], ctx.fingerprint, store.MATCH_KEYS)
        if same:
            doc["channels"] = {key: v for key, v in old.get("channels", {}).items() if int(key) not in recs}
            kept = len(doc["channels"])
    doc["channels"].update({str(c): recs[c] for c in channels})
    doc["channels"] = dict(sorted(doc["channels"].items(), key=lambda kv: int(kv[0])))
    atomic.write_json(path, doc, indent=1 if len(doc["channels"]) <= 64 else None)
    print(f"wrote {path} ({len(channels)} channels" + (f", and {kept} kept from an earlier run" if kept else "") + ")")


def positive_activation_histogram(ctx, A, targets, P, k, tau, pp, counts, chunk_rows):
    """H[y, c] under --importance_sign positive_activation, and what it changes against the published rule.

    The BatchNorm after the layer and the layer's output size come from forwards of a blank image (the
    store's transform makes every image 224 x 224). Returns (hist, report dict); prints the report.
    """
    _, positions, bn_name = label_free.layer_signs_and_positions(ctx.model, ctx.conv, blank(ctx))
    bn = None if bn_name is None else ctx.model.get_submodule(bn_name)
    if bn is None:
        print(f"note: no BatchNorm takes {ctx.layer_path}'s output: --importance_sign positive_activation uses "
              f"the layer's own summed activation")
    affine = None if bn is None else loading.batchnorm_affine(bn)
    # sign_histograms holds about four times class_histogram's memory per row: a quarter of the rows at a time
    h = similarities.sign_histograms(A, targets, P, k, tau, ctx.conv.weight, ctx.conv.bias, positions, affine,
                                     max(1, chunk_rows // 4), progress=True)
    used = {key: similarities.used_classes(h[key], counts, pp) for key in ("published", "positive_activation")}
    # pairs the published rule uses only thanks to images on which the layer's summed activation is negative
    without_negative = similarities.used_classes(h["published"] - h["negative_layer_activation"], counts, pp)

    def pairs(mask):  # (K, C) bool -> [[channel, class], ...]
        return [[int(c), int(y)] for y, c in torch.nonzero(mask).tolist()]
    report = {
        "batchnorm": bn_name,
        "output_positions": positions,
        "important_image_channel_pairs": int(h["published"].sum()),
        "important_with_negative_layer_activation": int(h["negative_layer_activation"].sum()),
        "important_with_positive_activation": int(h["positive_activation"].sum()),
        "used_pairs_published": int(used["published"].sum()),
        "used_pairs_positive_activation": int(used["positive_activation"].sum()),
        "used_only_through_negative_layer_activation": pairs(used["published"] & ~without_negative),
        "dropped_by_positive_activation": pairs(used["published"] & ~used["positive_activation"]),
        "added_by_positive_activation": pairs(used["positive_activation"] & ~used["published"]),
    }
    where = f"after {report['batchnorm']}" if bn is not None else f"of {ctx.layer_path}"
    print(f"importance_sign positive_activation: an image counts for channel c only where c's summed activation "
          f"{where} is positive")
    print(f"  important (image, channel) pairs: {report['important_image_channel_pairs']}, of which "
          f"{report['important_with_negative_layer_activation']} with a negative summed activation of "
          f"{ctx.layer_path} (before any BatchNorm) and {report['important_with_positive_activation']} with a "
          f"positive one {where}")
    print(f"  used (channel, class) pairs: published rule {report['used_pairs_published']}, positive_activation "
          f"{report['used_pairs_positive_activation']}; the published rule uses "
          f"{len(report['used_only_through_negative_layer_activation'])} only through images with a negative "
          f"summed activation of {ctx.layer_path}: {report['used_only_through_negative_layer_activation']} "
          f"([channel, class]); dropped: {report['dropped_by_positive_activation']}")
    return h["positive_activation"], report


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
