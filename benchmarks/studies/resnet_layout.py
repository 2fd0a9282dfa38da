"""The method in the paper's layout: the ResNet demo (``demo/run_demo.py --arch resnet``), both importance
rules of stage 2, every best-rho score that stage 3 offers, for several seeds (issue 13).

Per seed: the whole demo once (``python -m demo.run_demo --arch resnet``: data, training, the four stages
with the published rules), then on its store and model, for each ``--importance_sign`` (published,
positive_activation): stage 2, the candidate with the lowest cosine, and for each ``--rho_score``: stage 3
on it (one run scores every rho both ways; its info JSON records both choices) and, for each
``--rho_scores`` choice, stage 4 on the val images with that rho's checkpoint (``--f``).

Stage 2's report under positive_activation is the measurement of how often the published rule counts a
(channel, class) only through images on which the layer's summed activation (before its BatchNorm) is
negative: ``used_only_through_negative_layer_activation``.

  python -m benchmarks.studies.resnet_layout --out demo_runs/resnet [--seeds 0 1 2] [--train_per_class 100]
      [--val_per_class 30] [--epochs 12] [--aux_weight W] [--rho_scores published robust] [--reuse_demo]

Writes OUT/resnet_layout.json and prints one table row per (seed, importance rule, rho score). The digits
depend on the CPU (see docs/results.md).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo.networks import SHAPES_SPECS as MODELS
from demo.runner import Runner
from utils.files.names import SIGN_SUFFIX as SUFFIX
from utils.files.atomic import read_json
from utils.model.loading import model_tag

SIGNS = tuple(SUFFIX)


def reusable_report(out, seed, args):
    """The report of an earlier demo run in ``out`` made with the same settings, or None."""
    path = os.path.join(out, "report.json")
    if not os.path.isfile(path):
        return None
    rep = read_json(path)
    t = rep.get("training", {})
    same = (rep.get("arch") == "resnet" and t.get("seed") == seed and t.get("epochs") == args.epochs
            and t.get("train_images") == 9 * args.train_per_class and t.get("val_images") == 9 * args.val_per_class
            and (args.aux_weight is None or t.get("aux_weight") == args.aux_weight))
    return rep if same else None


def one_seed(out, seed, args):
    """The demo for ``seed`` into ``out``, then every (importance rule, rho score); returns a list of rows."""
    demo = [sys.executable, "-m", "demo.run_demo", "--out", out, "--arch", "resnet", "--seed", str(seed),
            "--train_per_class", str(args.train_per_class), "--val_per_class", str(args.val_per_class),
            "--epochs", str(args.epochs), "--no_feature_vis"] + ([] if args.aux_weight is None else ["--aux_weight", str(args.aux_weight)])
    rep = reusable_report(out, seed, args) if args.reuse_demo else None
    if rep is None:
        print("$ " + " ".join(demo[1:]), flush=True)
        subprocess.run(demo, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        rep = read_json(os.path.join(out, "report.json"))
    else:
        print(f"reusing the demo run in {out} (--reuse_demo)", flush=True)
    model, weights = MODELS["resnet"], os.path.join(out, "model.pth")
    data_dir, store_dir = os.path.join(out, "data"), os.path.join(out, "store")
    common = ["--data_dir", data_dir, "--model", model, "--weights", weights, "--num_workers", 0]
    th = rep["stage2_thresholds"]
    tau, pp, low, high = th["proportion_attribution_required"], th["p"], th["cos_sim_low"], th["cos_sim_high"]
    tag = model_tag(model)
    r = Runner(out)
    rows = []
    for sign in SIGNS:
        r.run(f"variant_stage2_{sign}", "get_cosine_similarities.py", common + [
            "--store_dir", store_dir, "--proportion_attribution_required", tau, "--p", pp, "--cos_sim_low", low,
            "--cos_sim_high", high, "--out_dir", os.path.join(out, "variants"), "--importance_sign", sign])
        cj = read_json(os.path.join(store_dir, "results_get_cosine_similarities",
                                    f"{tag}_required{tau}_p{pp}_cossim{low}to{high}{SUFFIX[sign]}_candidates.json"))
        cands = sorted(cj["candidates"], key=lambda d: (d["cosine_similarity"], d["channel"], d["class1"],
                                                        d["class2"]))
        names = cj["classes"]
        base = dict(seed=seed, importance_sign=sign, num_candidates=len(cands),
                    candidates=[[d["channel"], names[d["class1"]], names[d["class2"]],
                                 round(d["cosine_similarity"], 4)] for d in cands],
                    sign_report=cj.get("sign_report"), val_accuracy=rep["training"]["val_accuracy"])
        if not cands:
            rows.append(dict(base, skipped="no candidate"))
            continue
        best = cands[0]
        c, y1, y2 = best["channel"], best["class1"], best["class2"]
        pair = ["--classes_for_concept1", y1, "--classes_for_concept2", y2]
        # stage 3 once: it scores every rho by both scores; the info JSON records both choices
        r.run(f"variant_stage3_{sign}", "disentangle_channel.py", common + [
            "--store_dir", store_dir, "--channel_disentangle", c] + pair)
        run_name = f"{tag}_channel{c}_classes1{[y1]}_classes2{[y2]}"
        info = read_json(os.path.join(store_dir, "models_disentangled", run_name + "_info.json"))
        for score in args.rho_scores:
            row = dict(base, channel=c, class1=names[y1], class2=names[y2],
                       cosine_similarity=round(best["cosine_similarity"], 4), rho_score=score)
            rho = info[f"best_rho_{score}"]
            key = f"{sign}_{score}"
            # stage 4 on that rho's checkpoint (the published choice is also ..._f_best)
            r.run(f"variant_stage4_{key}", "get_results.py", common + [
                "--model_dir", store_dir, "--channel_of_interest", c] + pair + [
                "--f", rho, "--get_quantitative", "--proportion_attribution_required", 0.03,
                "--out_dir", os.path.join(out, "variants", key)])
            summary = read_json(os.path.join(out, "variants", key, "results_disentanglement",
                                             f"{run_name}_f{rho}_unnormalized_summary.json"))
            q1, q2 = summary.get("quantitative_concept1") or {}, summary.get("quantitative_concept2") or {}
            at = info["rhos"].index(rho)
            rows.append(dict(row, best_rho=rho, published_score=info["scores"][at],
                             robust_score=info["robust_scores"][at], dead_share=info[f"dead_share_{score}"],
                             published_choice_degenerate=info["published_choice_degenerate"],
                             sep_concept1=summary["sep_concept1"], sep_concept2=summary["sep_concept2"],
                             mean_pos_concept1=summary["mean_pos_concept1"],
                             mean_pos_concept2=summary["mean_pos_concept2"],
                             quantitative_concept1=q1, quantitative_concept2=q2,
                             max_logit_diff=info["max_logit_diff"], logits_unchanged=info["exact"]))
    return rows


def table(rows):
    head = ("| seed | stage 2 rule | candidates | lowest cosine: channel, classes (cosine) | rho score | best rho "
            "| own map dead (c1/c2) | mean pos(original) c1/c2 | sep 1 | sep 2 | D1/orig, D2/orig (images): concept 1 "
            "| concept 2 | max logit diff |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for w in rows:
        if "channel" not in w:
            lines.append(f"| {w['seed']} | {w['importance_sign']} | {w['num_candidates']} | {w['skipped']} |")
            continue
        pick = f"{w['channel']}: {w['class1']} vs {w['class2']} ({w['cosine_similarity']:.3f})"
        q1, q2 = w["quantitative_concept1"], w["quantitative_concept2"]
        dead = "/".join(f"{100 * d:.0f}%" for d in w["dead_share"]) if w.get("dead_share") else "?"
        orig = f"{w['mean_pos_concept1']['original']:.3g} / {w['mean_pos_concept2']['original']:.3g}"
        lines.append(
            f"| {w['seed']} | {w['importance_sign']} | {w['num_candidates']} | {pick} | {w['rho_score']} | "
            f"{w['best_rho']} | {dead} | {orig} | {w['sep_concept1']:.3g} | {w['sep_concept2']:.3g} | "
            f"{q1.get('D1/orig', float('nan')):.2f}, {q1.get('D2/orig', float('nan')):.2f} ({q1.get('images', 0)}) | "
            f"{q2.get('D1/orig', float('nan')):.2f}, {q2.get('D2/orig', float('nan')):.2f} ({q2.get('images', 0)}) | "
            f"{w['max_logit_diff']:.2g} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder; one subfolder per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_per_class", type=int, default=100)
    p.add_argument("--val_per_class", type=int, default=30)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--aux_weight", type=float, default=None, help="demo/run_demo.py --aux_weight (default: its own)")
    p.add_argument("--reuse_demo", action="store_true",
                   help="keep an earlier demo run (data, model, store) of the same settings in OUT/seedN and only "
                        "rerun stages 2-4")
    p.add_argument("--rho_scores", nargs="+", default=["published", "robust"])
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        rows += one_seed(os.path.abspath(os.path.join(args.out, f"seed{seed}")), seed, args)
        with open(os.path.join(args.out, "resnet_layout.json"), "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    print(table(rows))
    reported = set()
    for w in rows:
        if w.get("sign_report") and w["importance_sign"] == "positive_activation" and w["seed"] not in reported:
            reported.add(w["seed"])
            s = w["sign_report"]
            print(f"seed {w['seed']}: {s['important_with_negative_layer_activation']} of "
                  f"{s['important_image_channel_pairs']} important (image, channel) pairs have a negative summed "
                  f"activation before {s['batchnorm']}; used (channel, class) pairs: published "
                  f"{s['used_pairs_published']}, positive_activation {s['used_pairs_positive_activation']}; "
                  f"used only through such images: {s['used_only_through_negative_layer_activation']}; dropped: "
                  f"{s['dropped_by_positive_activation']}; added: {s['added_by_positive_activation']}")
    print(f"wrote {os.path.join(args.out, 'resnet_layout.json')}")


if __name__ == "__main__":
    main()
