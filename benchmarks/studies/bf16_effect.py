"""How much bfloat16 autocast (--autocast_bf16) and channels_last move stage 1's attributions and the
stage-2 candidate list, on the benchmark workload (benchmarks/workload.py; random weights, so the numbers show the
size of the rounding effect, not a property of the paper's trained ResNet-50).

  python -m benchmarks.studies.bf16_effect [--workdir DIR] [--device cpu|cuda]
"""
import argparse
import os

import numpy as np

from benchmarks import measure, workload

SETTINGS = [((0.007, 0.75), "benchmark tau/p"), ((0.005, 0.5), "more pairs")]


def stage1(wl, workdir, device, name, autocast, channels_last, build=workload.build_model):
    import torch

    from utils.data import folders
    from utils.stages import stage1_pass
    from utils.model import loading
    from utils.files import store
    model, conv = build()
    ds = wl.dataset(workdir, "train")
    folder = store.store_folder(os.path.join(workdir, name), "bench")
    info = dict(model="bench", weights_sha256=loading.weights_sha256(model), layer=workload.LAYER,
                layer_geometry=loading.layer_geometry(conv), transform="bench", decode="cpu",
                autocast="bfloat16" if autocast else None, **folders.dataset_summary(ds))
    stage1_pass.run_stage1(model, conv, ds, folder, info,
                      stage1_pass.PassSettings(wl.batch_size, torch.device(device), 0, None,
                                          autocast_dtype=torch.bfloat16 if autocast else None,
                                          channels_last=channels_last),
                      log=lambda *a: None)
    arrays = {n: np.load(os.path.join(folder, n + ".npy")) for n in ("attributions", "targets", "predictions", "patch_sums")}
    return arrays, conv.weight.detach().cpu()


def stage2(arrays, weight, classes, tau, p, low=-1.0, high=1.0):
    from utils.method import similarities
    from utils.stages import stage2_passes
    hist = stage2_passes.class_histogram(arrays["attributions"], arrays["targets"], classes, tau)
    used = similarities.used_classes(hist, similarities.class_counts(arrays["targets"], classes), p)
    means = stage2_passes.class_mean_patch_sums(arrays["patch_sums"], arrays["targets"], classes)
    cands = similarities.candidate_pairs(weight, means, used, low, high)
    return used, {(d["channel"], d["class1"], d["class2"]): d["cosine_similarity"] for d in cands}


def compare(ref, other, weight, label, classes):
    import torch

    from utils.method.attribution import important_channels
    a, b = ref["attributions"].astype(np.float64), other["attributions"].astype(np.float64)
    per_image = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    pa = ref["patch_sums"].astype(np.float64)
    pb = other["patch_sums"].astype(np.float64)
    p_rel = np.abs(pa - pb).max() / np.abs(pa).max()
    print(f"{label}: attributions: max |dA| / max |A| = {np.abs(a - b).max() / np.abs(a).max():.3g}, "
          f"per-image ||dA|| / ||A||: median {np.median(per_image):.3g}, max {per_image.max():.3g}; "
          f"patch sums: max rel. change {p_rel:.3g}; predictions changed: "
          f"{int((ref['predictions'] != other['predictions']).sum())} of {len(a)}")
    out = {"max_rel_attr": float(np.abs(a - b).max() / np.abs(a).max()),
           "median_image_rel_attr": float(np.median(per_image)), "max_image_rel_attr": float(per_image.max()),
           "patch_sums_max_rel": float(p_rel)}
    for (tau, p), what in SETTINGS:
        ia = important_channels(torch.from_numpy(ref["attributions"]), tau)
        ib = important_channels(torch.from_numpy(other["attributions"]), tau)
        flips = int((ia != ib).sum())
        ua, ca = stage2(ref, weight, classes, tau, p)
        ub, cb = stage2(other, weight, classes, tau, p)
        common_keys = set(ca) & set(cb)
        cos_diff = max((abs(ca[k] - cb[k]) for k in common_keys), default=0.0)
        win_a = {k for k, v in ca.items() if 0.0 <= v < 0.5}
        win_b = {k for k, v in cb.items() if 0.0 <= v < 0.5}
        print(f"  tau={tau}, p={p} ({what}): importance flips {flips} of {ia.numel()} (image, channel) "
              f"({int(ia.sum())} important in fp32); used pairs {int(ua.sum())} -> {int(ub.sum())} "
              f"({int((ua != ub).sum())} differ); all-cosine pairs {len(ca)} -> {len(cb)} "
              f"({len(set(ca) ^ set(cb))} differ), max |d cos| on common {cos_diff:.2g}; "
              f"candidates with 0 <= cos < 0.5: {len(win_a)} -> {len(win_b)} ({len(win_a ^ win_b)} differ)")
        out[f"tau{tau}_p{p}"] = {"importance_flips": flips, "important_fp32": int(ia.sum()),
                                 "used_fp32": int(ua.sum()), "used_other": int(ub.sum()),
                                 "used_differ": int((ua != ub).sum()), "pairs_fp32": len(ca), "pairs_other": len(cb),
                                 "pairs_differ": len(set(ca) ^ set(cb)), "max_cos_diff": cos_diff,
                                 "window_fp32": len(win_a), "window_other": len(win_b),
                                 "window_differ": len(win_a ^ win_b)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    wl = workload.DEFAULT
    with measure.workdir_from(wl, args.workdir) as workdir:
        print(f"workload: {wl.describe()}; device {args.device}")
        ref, w = stage1(wl, workdir, args.device, "fp32", False, False)
        cl, _ = stage1(wl, workdir, args.device, "cl", False, True)
        bf, _ = stage1(wl, workdir, args.device, "bf16", True, True)
        compare(ref, cl, w, "channels_last vs fp32", wl.classes)
        compare(ref, bf, w, "bf16 autocast + channels_last vs fp32", wl.classes)


if __name__ == "__main__":
    main()
