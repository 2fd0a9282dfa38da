"""Start-up of the four stage scripts: wall time of ``--help`` and of a run on a one-image-per-class data
set with a tiny model, and which heavy modules each of them imports.

  python -m benchmarks.startup [--repeat 3] [--json FILE]

Each command runs as ``python SCRIPT ...`` in a fresh process (wall time from start to exit, the
fastest of --repeat runs; the store is made afresh before every round, so stage 1 really runs). One
more round runs every command under ``python -X importtime`` to list the heavy modules it imported
(matplotlib, scipy, seaborn, sklearn, pandas, sympy, torch._dynamo) and the seconds spent importing
torch, torchvision, matplotlib and scipy in that run, each with what it pulled in first (torchvision's
include torch._dynamo and sympy, which torchvision.ops imports; importtime inflates them a little). The data:
4 classes x 1 train + 1 val generated JPEG; the model: tests.tiny_models:tiny_resnet (--weights none).
Baselines: ``python -c pass``, ``import torch``, ``import torch, torchvision``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("matplotlib", "scipy", "seaborn", "sklearn", "pandas", "sympy", "torch._dynamo")
TIMED = ("torch", "torchvision", "matplotlib", "scipy")
MODEL = ["--model", "tests.tiny_models:tiny_resnet", "--weights", "none"]


def make_data(root, classes=4):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            img = rng.random((48, 64, 3)) * 0.6 + rng.random(3) * 0.4
            Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(d, "img000.jpg"))


def commands(data, store):
    """(label, argv after the interpreter) in the order a pipeline runs them."""
    s1, s2 = "get_importances_for_classes.py", "get_cosine_similarities.py"
    s3, s4 = "disentangle_channel.py", "get_results.py"
    concepts = ["--classes_for_concept1", "0", "--classes_for_concept2", "1"]
    return [
        ("python -c pass", ["-c", "pass"]),
        ("import torch", ["-c", "import torch"]),
        ("import torch, torchvision", ["-c", "import torch, torchvision"]),
        (f"{s1} --help", [s1, "--help"]),
        (f"{s2} --help", [s2, "--help"]),
        (f"{s3} --help", [s3, "--help"]),
        (f"{s4} --help", [s4, "--help"]),
        (f"{s1} (4 images)", [s1, "--data_dir", data, "--store_dir", store, *MODEL]),
        (f"{s2}", [s2, "--data_dir", data, "--store_dir", store, *MODEL, "--proportion_attribution_required",
                   "0.03", "--p", "0.5"]),
        (f"{s3} (2 images)", [s3, "--data_dir", data, "--store_dir", store, *MODEL, "--channel_disentangle", "0",
                              *concepts]),
        (f"{s4} (2 images)", [s4, "--data_dir", data, "--model_dir", store, *MODEL, "--channel_of_interest", "0",
                              *concepts]),
        (f"{s4} --get_qualitative", [s4, "--data_dir", data, "--model_dir", store, *MODEL, "--channel_of_interest",
                                     "0", *concepts, "--get_qualitative"]),
    ]


def run(argv, cwd, importtime=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + \
          [os.path.join(ROOT, argv[0]) if argv[0].endswith(".py") else argv[0]] + argv[1:]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return secs, proc.stderr


def parse_importtime(stderr):
    """[(depth, module, cumulative seconds)] from ``-X importtime`` output, in its order (children first)."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line[len("import time:"):].split("|")
        out.append(((len(name) - len(name.lstrip())) // 2, name.strip(), int(cum) / 1e6))
    return out


def in_package(name, pkg):
    return name == pkg or name.startswith(pkg + ".")


def package_seconds(rows, pkg):
    """Seconds spent importing ``pkg`` and what it pulled in first: the cumulative times of its modules
    whose importer is not itself part of ``pkg`` (None if it was not imported)."""
    total, seen = 0.0, False
    for i, (depth, name, cum) in enumerate(rows):
        if not in_package(name, pkg):
            continue
        seen = True
        parent = next((n for d, n, _ in rows[i + 1:] if d < depth), None)
        if parent is None or not in_package(parent, pkg):
            total += cum
    return total if seen else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; the fastest counts (default 3)")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="startup_")
    try:
        data, store, cwd = (os.path.join(tmp, d) for d in ("data", "store", "cwd"))
        make_data(data)
        os.makedirs(cwd)
        cmds = commands(data, store)
        times = {label: [] for label, _ in cmds}
        for _ in range(args.repeat + 1):  # the last round under -X importtime
            importtime = len(times[cmds[0][0]]) == args.repeat
            shutil.rmtree(store, ignore_errors=True)
            for label, argv in cmds:
                secs, err = run(argv, cwd, importtime)
                if importtime:
                    rows = parse_importtime(err)
                    secs = {m: package_seconds(rows, m) for m in HEAVY + TIMED}
                    times[label] = {"seconds": min(times[label]), "all_seconds": times[label],
                                    "heavy": [h for h in HEAVY if secs[h] is not None],
                                    "import_s": {m: secs[m] for m in TIMED if secs[m] is not None}}
                else:
                    times[label].append(secs)
        print(f"start-up, fastest of {args.repeat} runs ({os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}); imports from one more run under -X importtime")
        print("| command | wall s | torch / torchvision / matplotlib / scipy import s | heavy modules imported |")
        print("| --- | ---: | --- | --- |")
        for label, _ in cmds:
            r = times[label]
            imp = " / ".join(f"{r['import_s'][m]:.2f}" if m in r["import_s"] else "-" for m in TIMED)
            print(f"| {label} | {r['seconds']:.2f} | {imp} | {', '.join(r['heavy']) or 'none'} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(times, f, indent=1)
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
