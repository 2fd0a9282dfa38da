"""The steps of benchmarks/gpu_suite.sh, one subcommand each; every result is a line
``ROW<TAB>name<TAB>result`` that the suite puts into its table.

  python -m benchmarks.gpu_steps setup WORK [--images 8000] [--mid 512] [--few 64] [--processes 16]
  python -m benchmarks.gpu_steps model WORK [--batch_size 256] [--steps 30]
  python -m benchmarks.gpu_steps stage1 WORK --decoder cpu|nvjpeg|nvimgcodec --precision tf32|bf16
  python -m benchmarks.gpu_steps compare WORK
  python -m benchmarks.gpu_steps deterministic WORK
  python -m benchmarks.gpu_steps torchrun WORK
  python -m benchmarks.gpu_steps featurevis WORK [--size 512 --steps 256 --crops 32]
  python -m benchmarks.gpu_steps featurevis_many WORK [--channels 8 --size 512 --steps 16 --crops 32]

WORK holds the generated JPEGs (big/ for throughput, mid/ for reproducibility, few/ for the CPU
comparison), the ResNet-50 weights (random, seeded: nothing is downloaded) and the stores. Without CUDA
the steps run on the CPU where that means something (CPU decoding, the store comparison, which is then
CPU against CPU and must give 0, determinism, torchrun) and report CUDA-only rows as "skipped: no CUDA".
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = os.path.join(ROOT, "get_importances_for_classes.py")
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")
FOLDER = "resnet50_channel_importances"


def row(name, result):
    print(f"ROW\t{name}\t{result}", flush=True)


def cuda():
    import torch
    return torch.cuda.is_available()


def settings(work):
    with open(os.path.join(work, "settings.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ setup

def setup(args):
    import torch
    import torchvision
    from benchmarks import make_jpegs
    t = time.time()
    for name, n in (("big", args.images), ("mid", args.mid), ("few", args.few)):
        make_jpegs.write_jpegs(os.path.join(args.work, name), n, classes=10, processes=args.processes,
                               seed={"big": 0, "mid": 1, "few": 2}[name])
    gen = time.time() - t
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    torch.save(model.state_dict(), os.path.join(args.work, "resnet50_seed0.pt"))
    s = {"images": args.images, "mid": args.mid, "few": args.few, "batch_size": args.batch_size,
         "workers": args.workers, "cuda": torch.cuda.is_available()}
    with open(os.path.join(args.work, "settings.json"), "w") as f:
        json.dump(s, f)
    try:
        from utils.data import gpu_decode
        nv = "nvImageCodec importable" if gpu_decode.nvimgcodec_available() else "no nvImageCodec"
        if torch.cuda.is_available():
            lines = []
            jpegs = gpu_decode.choose_jpegs(torch.device("cuda", 0), "auto", lines.append)
            nv = f"{nv}; GPU decoder chosen: {getattr(jpegs, 'name', None)} ({' / '.join(lines)})"
    except Exception as e:  # noqa: BLE001
        nv = f"GPU decoder check failed: {type(e).__name__}: {e}"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    row("setup", f"{args.images}+{args.mid}+{args.few} JPEGs in {gen:.1f} s ({args.processes} processes); "
                 f"torch {torch.__version__}, torchvision {torchvision.__version__}, {dev}; {nv}")


# ------------------------------------------------------------------ model step alone

def model_step(args):
    import torch
    import torchvision
    from utils.stages import stage1_pass
    s = settings(args.work)
    bs = args.batch_size or s["batch_size"]
    rates = {}
    device = torch.device("cuda", 0) if cuda() else torch.device("cpu")
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(os.path.join(args.work, "resnet50_seed0.pt")))
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    conv = model.get_submodule("layer4.2.conv3")
    x = torch.randn(bs, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (bs,), device=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for name in ("float32", "TF32", "bfloat16"):
        if device.type != "cuda" and name == "TF32":
            row(f"model step {name}", "skipped: no CUDA")
            continue
        if device.type == "cuda":
            precision = "tf32" if name == "TF32" else "ieee"
            torch.backends.cudnn.conv.fp32_precision = precision
            torch.backends.cuda.matmul.fp32_precision = precision
        amp = torch.bfloat16 if name == "bfloat16" else None
        for _ in range(2):  # warm-up (cuDNN picks its algorithms)
            stage1_pass.stage1_batch(model, conv, x, y, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for _ in range(args.steps):
            stage1_pass.stage1_batch(model, conv, x, y, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = args.steps * bs / (time.time() - t)
        row(f"model step {name}", f"{rates[name]:.0f} images/s (ResNet-50 layer4.2.conv3, batch {bs}, "
                                  f"channels_last, {device.type})")
    with open(os.path.join(args.work, "model.json"), "w") as f:
        json.dump(rates, f)


# ------------------------------------------------------------------ running the stage script

def stage1_cmd(work, data, store, device, *flags, launcher=None, batch_size=None, workers=None):
    s = settings(work)
    cmd = [sys.executable, STAGE1]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", STAGE1]
    return cmd + ["--data_dir", os.path.join(work, data), "--store_dir", os.path.join(work, store),
                  "--model", "resnet50", "--weights", os.path.join(work, "resnet50_seed0.pt"),
                  "--layer_of_interest", "layer4.2.conv3", "--device", device,
                  "--batch_size", str(batch_size or s["batch_size"]), "--num_workers", str(workers or s["workers"]),
                  *flags]


def run_stage1(cmd, timeout=None):
    """Run the stage script; returns (ok, stdout + stderr). The output also goes to this step's log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line[-300:] for line in out.splitlines()[-25:])  # progress bars make long lines
    print(tail, flush=True)
    print(f"(exit {proc.returncode} after {time.time() - t:.1f} s)", flush=True)
    return proc.returncode == 0, out


def done_rates(out):
    """(images/s overall, images/s after the first batch or None) from the stage's 'done:' line."""
    m = re.search(r"done: \d+ images in [\d.]+ s \(([\d.]+) images/s(?:; ([\d.]+) images/s after)?", out)
    if not m:
        return None, None
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


def last_error(out):
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error") or "Error" in ln]
    return (errs or lines or ["no output"])[-1][:160]


def read_store(work, store):
    folder = os.path.join(work, store, FOLDER)
    arrays = {n: np.load(os.path.join(folder, n + ".npy")) for n in ARRAYS}
    with open(os.path.join(folder, "manifest.json")) as f:
        return arrays, json.load(f)


def stage1_step(args):
    from utils.data import gpu_decode
    s = settings(args.work)
    name = (f"stage 1 {args.decoder} decoding{' --fast_resize' if args.fast_resize else ''}, "
            f"{'bfloat16' if args.precision == 'bf16' else 'TF32'}")
    if args.decoder != "cpu" and not s["cuda"]:
        return row(name, "skipped: no CUDA")
    if args.decoder == "nvimgcodec" and not gpu_decode.nvimgcodec_available():
        return row(name, "skipped: nvidia-nvimgcodec not installed")
    flags = ["--channels_last"] + (["--autocast_bf16"] if args.precision == "bf16" else ["--tf32"])
    if args.decoder != "cpu":
        flags += ["--gpu_decode", "--gpu_decoder", args.decoder]
    if args.fast_resize:
        flags += ["--fast_resize"]
    store = f"s_{args.decoder}_{args.precision}{'_fast' if args.fast_resize else ''}"
    ok, out = run_stage1(stage1_cmd(args.work, "big", store, "cuda" if s["cuda"] else "cpu", *flags))
    if not ok:
        return row(name, f"FAILED: {last_error(out)}")
    overall, steady = done_rates(out)
    _, manifest = read_store(args.work, store)
    used = manifest["numerics"].get("decoder", manifest["decode"])
    model = {}
    if os.path.isfile(os.path.join(args.work, "model.json")):
        with open(os.path.join(args.work, "model.json")) as f:
            model = json.load(f)
    ref = model.get("bfloat16" if args.precision == "bf16" else "TF32")
    share = f", {100 * steady / ref:.0f} % of the model step" if (ref and steady) else ""
    row(name, f"{steady or overall:.0f} images/s after the first batch ({overall:.0f} with start-up; "
              f"{s['images']} images, {s['workers']} workers, decoder {used}{share})")


# ------------------------------------------------------------------ comparisons of stores

def relative_l2(a, b):
    """Per-image ||a - b|| / ||a|| of the attribution rows: (median, max)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
    return float(np.median(rel)), float(rel.max())


def describe_difference(ref, other):
    med, mx = relative_l2(ref["attributions"], other["attributions"])
    pr = float(np.abs(ref["patch_sums"].astype(np.float64) - other["patch_sums"]).max()
               / max(np.abs(ref["patch_sums"]).max(), 1e-30))
    flips = int((ref["predictions"] != other["predictions"]).sum())
    return (f"attributions rel. L2 per image: median {med:.3g}, max {mx:.3g}; patch sums max rel. {pr:.3g}; "
            f"predictions changed {flips} of {len(ref['predictions'])}")


def compare_step(args):
    s = settings(args.work)
    dev = "cuda" if s["cuda"] else "cpu"
    ok, out = run_stage1(stage1_cmd(args.work, "few", "c_cpu", "cpu", "--cpu_threads", "4", batch_size=16, workers=2))
    if not ok:
        return row("store vs CPU store", f"FAILED (CPU store): {last_error(out)}")
    ref, _ = read_store(args.work, "c_cpu")
    runs = [(f"store {dev} float32 (CPU decoding) vs CPU store", "c_dev", [])]
    if s["cuda"]:
        runs.append(("store cuda --gpu_decode vs CPU store", "c_gpu", ["--gpu_decode"]))
    for name, store, flags in runs:
        extra = ["--cpu_threads", "4"] if dev == "cpu" else []
        ok, out = run_stage1(stage1_cmd(args.work, "few", store, dev, *flags, *extra, batch_size=16, workers=2))
        if not ok:
            row(name, f"FAILED: {last_error(out)}")
            continue
        other, _ = read_store(args.work, store)
        row(name, describe_difference(ref, other) + f" ({s['few']} images)")


def same_bytes(work, a, b):
    """'byte-identical' or how the two stores differ (attributions and patch sums)."""
    x, _ = read_store(work, a)
    y, _ = read_store(work, b)
    differ = [n for n in ARRAYS if x[n].tobytes() != y[n].tobytes()]
    if not differ:
        return "byte-identical"
    rows = int((x["attributions"] != y["attributions"]).any(axis=1).sum())
    return f"differ in {', '.join(differ)} ({rows} of {len(x['attributions'])} attribution rows); " + \
        describe_difference(x, y)


def deterministic_step(args):
    s = settings(args.work)
    dev = "cuda" if s["cuda"] else "cpu"
    extra = ["--cpu_threads", "2"] if dev == "cpu" else []
    for label, flags, stores in (("--deterministic", ["--deterministic"], ("d_a", "d_b")),
                                 ("default (cuDNN benchmark)", [], ("n_a", "n_b"))):
        ok = True
        for store in stores:
            good, out = run_stage1(stage1_cmd(args.work, "mid", store, dev, *flags, *extra))
            if not good:
                row(f"two runs {label}", f"FAILED: {last_error(out)}")
                ok = False
                break
        if ok:
            row(f"two runs {label}", same_bytes(args.work, *stores) + f" ({s['mid']} images, {dev})")


def torchrun_step(args):
    s = settings(args.work)
    dev = "cuda" if s["cuda"] else "cpu"
    extra = ["--cpu_threads", "2"] if dev == "cpu" else []
    for label, flags, plain in (("--deterministic", ["--deterministic"], "d_a"), ("default", [], "n_a")):
        name = f"torchrun 1 process vs plain run, {label}"
        if not os.path.isfile(os.path.join(args.work, plain, FOLDER, "manifest.json")):
            row(name, "skipped: the plain run of the deterministic step is missing")
            continue
        store = "t_" + plain
        ok, out = run_stage1(stage1_cmd(args.work, "mid", store, dev, *flags, *extra, launcher="torchrun"))
        if not ok:
            row(name, f"FAILED: {last_error(out)}")
            continue
        row(name, same_bytes(args.work, plain, store) + f" ({s['mid']} images, {dev})")


# ------------------------------------------------------------------ feature visualization

def featurevis_step(args):
    import torch
    import torchvision
    from benchmarks import bench_featurevis as bf
    from utils.featurevis import objectives, render
    device = torch.device("cuda", 0) if cuda() else torch.device("cpu")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    conv = model.get_submodule("layer4.2.conv3")
    sd = bf.synthetic_checkpoint(conv, bf.CHANNEL)  # on the CPU, before the model moves
    model.to(device)
    w, b, names = objectives.target_filters(conv, bf.CHANNEL, sd)
    m, q = bf.spectrum(args.size)
    net = render.ModelInput(model, conv, device=device)
    render.visualize(net, w, b, 0, render.Maco(m, q, args.size, min(2, args.steps), args.crops,
                                               progress=False))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    render.visualize(net, w, b, 0, render.Maco(m, q, args.size, args.steps, args.crops, progress=False))
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t
    row("feature visualization", f"{secs:.1f} s for {len(names)} targets, S={args.size}, {args.steps} steps, "
                                 f"{args.crops} crops ({secs / args.steps * 1000:.0f} ms/step, {device.type})")


def featurevis_many_step(args):
    """K channels' visualizations (3 targets each), one optimization per channel against one batched optimization
    of all K (benchmarks/bench_featurevis_many.py), timed over ``--steps`` and given per channel at 256 steps
    (the time per step is constant after the warm-up)."""
    from benchmarks import bench_featurevis_many as bm
    device = "cuda" if cuda() else "cpu"
    t_alone, t_many, _ = bm.compare(args.channels, args.size, args.steps, args.crops, batch_size=args.batch_size,
                                    device=device)
    per = 256 / args.steps / args.channels
    row(f"feature visualization, {args.channels} channels",
        f"one by one {t_alone * per:.2f} s/channel, batched {t_many * per:.2f} s/channel at 256 steps "
        f"({t_alone / t_many:.2f}x; S={args.size}, {args.crops} crops, timed over {args.steps} steps, {device})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("setup")
    a.add_argument("--images", type=int, default=8000)
    a.add_argument("--mid", type=int, default=512)
    a.add_argument("--few", type=int, default=64)
    a.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    a.add_argument("--batch_size", type=int, default=256)
    a.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    a = sub.add_parser("model")
    a.add_argument("--steps", type=int, default=30)
    a.add_argument("--batch_size", type=int, default=None, help="default: the setup's")
    a = sub.add_parser("stage1")
    a.add_argument("--decoder", choices=("cpu", "nvjpeg", "nvimgcodec"), required=True)
    a.add_argument("--precision", choices=("tf32", "bf16"), required=True)
    a.add_argument("--fast_resize", action="store_true")
    sub.add_parser("compare")
    sub.add_parser("deterministic")
    sub.add_parser("torchrun")
    a = sub.add_parser("featurevis")
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--steps", type=int, default=256)
    a.add_argument("--crops", type=int, default=32)
    a = sub.add_parser("featurevis_many")
    a.add_argument("--channels", type=int, default=8)
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--steps", type=int, default=16)
    a.add_argument("--crops", type=int, default=32)
    a.add_argument("--batch_size", type=int, default=256, help="crops per forward (0: all of a step's)")
    for a in sub.choices.values():
        a.add_argument("work")
    args = p.parse_args()
    {"setup": setup, "model": model_step, "stage1": stage1_step, "compare": compare_step,
     "deterministic": deterministic_step, "torchrun": torchrun_step, "featurevis": featurevis_step,
     "featurevis_many": featurevis_many_step}[args.step](args)


if __name__ == "__main__":
    main()
