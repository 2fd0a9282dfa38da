"""Time of the whole real-image run, part by part: Fashion-MNIST conversion, training, the four stages,
label-free concepts, SAE view, feature visualizations, and the purity benchmark over seeds.

  python -m benchmarks.fashion_mnist [--report fmnist_out/run/report.json]      # the table of a finished run
  python -m benchmarks.fashion_mnist --run [run_fashion flags ...]               # run demo/run_fashion.py first
  python -m benchmarks.fashion_mnist --purity_json fmnist_out/purity.json        # add the purity run's seconds

The run's own clock (report.json "seconds", the feature visualization's and SAE view's records) gives the
parts; stage 4 of the strongest split includes its feature visualizations and SAE view. Times depend on the
CPU and on what else runs on it: on a machine whose cores are shared, 2 training threads wait for each other
(run_fashion.py --train_threads 1 is then faster).
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parts(report):
    """[(part, seconds)] of a run_fashion report, in the order the run does them."""
    s = dict(report["seconds"])
    rows = [("conversion (IDX -> ImageFolder)", s.pop("conversion"))]
    tr = report["training"]
    rows.append((f"training ({tr['epochs']} epochs x {tr['train_images']} images, {tr['threads']} threads"
                 f"{', reused' if tr.get('reused') else ''})", tr["seconds"] if tr.get("reused") else s["training"]))
    s.pop("training")
    for key in list(s):
        if key == "total":
            continue
        label = {"stage1": "stage 1 (attributions, patch sums)", "stage2": "stage 2 (candidates)",
                 "stage2_label_free": "stage 2 --label_free"}.get(key, key.replace("_", " "))
        rows.append((label, s.pop(key)))
    first = report["splits"][0]
    if first.get("feature_vis"):
        fv = json.load(open(first["feature_vis"]["figure"].replace("/plots/feature_vis_", "/results_disentanglement/")
                            .replace(".png", "_feature_vis.json")))
        rows.append(("  of which feature visualizations", fv["seconds"]))  # spectrum included unless reused
    if first.get("sae_view"):
        run = os.path.basename(first["sae_view"]["figure"])[len("sae_view_"):-len(".png")]
        sv = json.load(open(os.path.join(os.path.dirname(os.path.dirname(first["sae_view"]["figure"])),
                                         "results_disentanglement", run + "_sae_view.json")))
        rows.append((f"  of which SAE view ({'SAE reused' if sv.get('sae_reused') else 'SAE training included'})",
                     sv["seconds"]))
    rows.append(("total", s["total"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default=os.path.join(ROOT, "fmnist_out", "run", "report.json"))
    p.add_argument("--run", action="store_true", help="run demo/run_fashion.py first (the remaining flags go to it)")
    p.add_argument("--purity_json", default=None, help="benchmarks/purity.py --data fashion_mnist --json FILE")
    args, rest = p.parse_known_args(argv)
    if args.run:
        from demo import run_fashion
        report = run_fashion.main(rest)
    else:
        if rest:
            p.error(f"unknown flags {rest} (runner flags go with --run)")
        with open(args.report) as f:
            report = json.load(f)
    tr = report["training"]
    print(f"test accuracy {report['test_accuracy']:.4f}; seconds per training epoch {tr['epoch_seconds']}")
    for part, sec in parts(report):
        print(f"{part:60} {sec:8.1f} s")
    if args.purity_json:
        with open(args.purity_json) as f:
            pur = json.load(f)
        for s in pur["per_seed"]:
            print(f"{'purity, seed ' + str(s['seed']) + ': its run (0 when reused)':60} {s['seconds_run']:8.1f} s")
            print(f"{'purity, seed ' + str(s['seed']) + ': SAE, splits and scoring':60} "
                  f"{s['seconds'] - s['seconds_run']:8.1f} s")


if __name__ == "__main__":
    main()
