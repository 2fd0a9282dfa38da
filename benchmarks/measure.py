"""How the stage benchmarks measure (not part of the test suite, which runs them once on their smallest workload).

Three implementations of each stage:
  ours       the functions the stage scripts call;
  published  the published script's algorithm as it is (docs/published_code.md), run on the CPU;
  naive      an older, simpler baseline doing the same computation (kept as an extra row).

Every implementation runs in a fresh child process (``python -m benchmarks.bench_stageN --child IMPL WORKDIR``)
with the same torch thread count (the workload's ``threads``, default os.cpu_count()): its wall time covers the
stage's work only (not the imports and the construction of the base model, which both sides share); its CPU time
(user + system of its threads, not of DataLoader worker processes) is reported beside it, which a loaded machine
disturbs less than the wall time; its peak memory is the child's VmHWM from /proc/self/status: the high-water
mark of its whole resident set, i.e. including about 0.4 GB for the Python interpreter, torch and the model
(reported apart as ``base``), and any file pages mapped into the process (worker processes are not counted).
The workload (benchmarks/workload.py) lives in WORKDIR/config.json, written by the parent.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kb(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


# ------------------------------------------------------------------ child side

def child_run(fn, workdir):
    """Run ``fn(wl, workdir, timer) -> dict`` (``with timer:`` around the measured part) with the workload's
    thread count; print one JSON line with the result, the measured seconds and the memory."""
    import torch
    wl = workload.Workload.load(workdir)
    torch.set_num_threads(wl.threads)
    torch.manual_seed(0)
    timer = Timer(wl.repeat)
    result = fn(wl, workdir, timer) or {}
    st = status_kb("VmHWM", "VmRSS")
    print(json.dumps(dict(result, seconds=timer.seconds, all_seconds=timer.times, cpu_seconds=timer.cpu_seconds,
                          peak_mb=st["VmHWM"] / 1024,
                          base_mb=timer.base_kb / 1024, threads=torch.get_num_threads())), flush=True)


class Timer:
    """Times the measured part: ``for _ in timer.runs(): with timer: ...``.

    ``seconds``: the fastest of the ``repeat`` runs (``--repeat``; the first also pays for one-off costs such as
    oneDNN's kernel setup, which a pass over a real data set amortizes; on a shared machine the minimum is
    also the least disturbed run). Ours and published run the same number of times; the naive stages 2 and
    3, made of dozens of passes where those costs are already amortized, run once (``timer.runs(1)``).
    ``base_kb``: the resident set just before the first run.
    """

    def __init__(self, repeat):
        self.repeat = repeat
        self.times, self.cpu_times, self.base_kb = [], [], None

    def runs(self, n=None):
        return range(self.repeat if n is None else n)

    @property
    def seconds(self):
        return min(self.times)

    @property
    def cpu_seconds(self):
        """CPU time (user + system, all threads of this process) of the fastest run."""
        return self.cpu_times[self.times.index(min(self.times))]

    def __enter__(self):
        if self.base_kb is None:
            self.base_kb = status_kb("VmRSS")["VmRSS"]
        self.t, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self.t)
        self.cpu_times.append(time.process_time() - self.cpu)
        return False


def main(impls, stage_fn, doc, argv=None):
    """A stage benchmark's command line: ``--child IMPL WORKDIR`` runs ``impls[IMPL]`` (fn(wl, workdir, timer) ->
    dict) as a child; anything else is the benchmark on its own (``standalone(stage_fn, doc, argv)``)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--child":
        return child_run(impls[argv[1]], argv[2])
    return standalone(stage_fn, doc, argv)


# ------------------------------------------------------------------ parent side

def run_child(module, impl, workdir):
    """``python -m MODULE --child IMPL WORKDIR`` from the repository root; its JSON line."""
    proc = subprocess.run([sys.executable, "-m", module, "--child", impl, workdir], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{module} {impl} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def compare(wl, stage, module, workdir, what, check=None):
    """Run ``ours``, ``published`` and (unless --no_naive) ``naive`` of ``module`` in fresh processes; print and
    return the stage's row.

    ``check(ours, other) -> dict`` compares another implementation's numbers with ours (added to the row
    as ``published_check`` and ``naive_check``); ``what`` is formatted with the row's fields."""
    ours = run_child(module, "ours", workdir)
    pub = run_child(module, "published", workdir)
    naive = run_child(module, "naive", workdir) if wl.naive else None
    row = {"stage": stage, "ours_s": ours["seconds"], "published_s": pub["seconds"],
           "ratio": pub["seconds"] / max(ours["seconds"], 1e-9),
           "ours_peak_mb": ours["peak_mb"], "published_peak_mb": pub["peak_mb"],
           "ours_base_mb": ours["base_mb"], "published_base_mb": pub["base_mb"],
           "ours_cpu_s": ours["cpu_seconds"], "published_cpu_s": pub["cpu_seconds"],
           "ours": ours, "published": pub}
    if naive is not None:
        row.update({"naive_s": naive["seconds"], "naive_ratio": naive["seconds"] / max(ours["seconds"], 1e-9),
                    "naive_peak_mb": naive["peak_mb"], "naive_base_mb": naive["base_mb"], "naive": naive})
    if check:
        row["published_check"] = check(ours, pub)
        if naive is not None:
            row["naive_check"] = check(ours, naive)
    row["what"] = what.format(**row)
    print_row(row)
    return row


def print_header():
    print(f"{'stage':<6} {'ours s':>8} {'publ. s':>8} {'publ./ours':>10} {'ours peak MB':>13} "
          f"{'publ. peak MB':>14}  {'naive s':>8} {'naive/ours':>10} {'naive peak MB':>14}")


def print_row(row):
    naive = (f"{row['naive_s']:>8.2f} {row['naive_ratio']:>9.1f}x {row['naive_peak_mb']:>8.0f} "
             f"({row['naive_base_mb']:.0f})" if "naive_s" in row else f"{'-':>8} {'-':>10} {'-':>14}")
    print(f"{row['stage']:<6} {row['ours_s']:>8.2f} {row['published_s']:>8.2f} {row['ratio']:>9.1f}x "
          f"{row['ours_peak_mb']:>8.0f} ({row['ours_base_mb']:.0f}) {row['published_peak_mb']:>8.0f} "
          f"({row['published_base_mb']:.0f})  {naive}", flush=True)
    print(f"       {row['what']}", flush=True)
    print(f"       CPU seconds of the measured part (this process's threads; loader workers not counted): ours "
          f"{row['ours_cpu_s']:.2f}, published {row['published_cpu_s']:.2f}", flush=True)


@contextlib.contextmanager
def workdir_from(wl, path=None):
    """The workload's own sub-folder (generated images inside, config.json written) of ``path``
    (created, kept) or of a temporary folder removed at the end."""
    tmp = None if path else tempfile.mkdtemp(prefix="bench_")
    try:
        sub = os.path.join(path or tmp, wl.key())
        os.makedirs(sub, exist_ok=True)
        wl.make_images(sub)
        wl.save(sub)
        yield sub
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def parse_args(doc, argv=None):
    """``python -m benchmarks.bench_stageN [--workdir W] [workload flags]``: the flags of one stage's benchmark."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="keep the generated images and stage outputs here (default: a temporary folder)")
    workload.add_args(p)
    return p.parse_args(argv)


def standalone(stage_fn, doc, argv=None):
    """Run one stage's benchmark on its own (``stage_fn(wl, workdir) -> row``); returns the row."""
    args = parse_args(doc, argv)
    wl = workload.Workload.from_args(args)
    with workdir_from(wl, args.workdir) as workdir:
        print(f"workload: {wl.describe()}")
        print_header()
        return stage_fn(wl, workdir)
