"""Before stage 4's feature visualizations: how many optimizations, and on a CPU about how long they take.

The plan is ``render.runs_of_targets`` over the jobs' targets (T = k + 1 per checkpoint; several jobs share an
optimization under --fv_batch_targets). On a CPU the time is measured, not guessed: one step of the first
optimization at the requested settings is run on a blank spectrum (same shapes, same work; nothing of it is
kept: the real run draws its own phases from its seed), and

    estimate = steps x (seconds of that step) x sum over optimizations of (targets / first one's targets)

since a step's work is one forward and backward of targets x crops crops through the model up to the layer.
A first step also carries one-off costs (allocations), so the estimate errs long. Where the settings are larger
than ``--fv_preset quick``, one step at the quick sizes is timed too, and the line names those flags.
On a GPU (or under torchrun) only the plan is printed: a first step there is mostly warm-up.
"""
import time

import torch

from utils.featurevis import render
from utils.featurevis import settings as fv_settings


def duration(seconds):
    """'42 s', '3.5 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan(target_counts, batch_targets):
    """The optimizations: [[job index, ...]] (``render.runs_of_targets``) and the targets of each."""
    runs = render.runs_of_targets(target_counts, batch_targets)
    return runs, [sum(target_counts[i] for i in run) for run in runs]


def scaled(step_seconds, steps, targets):
    """Estimated seconds of every optimization: ``steps`` steps each, a step's time proportional to its targets
    (``targets``: per optimization, the first one timed at ``step_seconds``)."""
    return steps * step_seconds * sum(t / targets[0] for t in targets)


def time_step(ctx, filters, size, crops, batch_size, input_size):
    """Seconds of one MACO step of ``filters`` = [(weights, bias)] at side ``size`` with ``crops`` crops, on a
    blank spectrum (magnitude ones, identity colour matrix)."""
    m = torch.ones(3, size, size // 2 + 1)
    groups = [(w, b, 0) for w, b in filters]
    tf = ctx.transform
    t0 = time.time()
    net = render.ModelInput(ctx.model.to(ctx.device), ctx.conv, input_size, mean=tf.mean, std=tf.std,
                            device=ctx.device)
    render.visualize_many(net, groups, render.Maco(m, torch.eye(3), size, 1, crops, batch_size=batch_size,
                                                   progress=False))
    return time.time() - t0


def announce(ctx, settings, filters, timed=None):
    """Print the plan of the feature visualizations of ``filters`` = [(weights (T_i, ...), bias)] per job, in
    order, and on a CPU the estimate. timed: ``time_step``-like function (tests), default ``time_step``.
    Returns the estimated seconds (None on a GPU)."""
    counts = [w.shape[0] for w, _ in filters]
    runs, targets = plan(counts, settings.batch_targets)
    what = (f"feature visualizations: {len(runs)} optimization{'s' if len(runs) != 1 else ''} of "
            f"{settings.steps} steps x {settings.crops} crops at S={settings.size}")
    if torch.device(ctx.device).type != "cpu":
        print(what)
        return None
    timed = timed or time_step
    first = [filters[i] for i in runs[0]]
    step = timed(ctx, first, settings.size, settings.crops, settings.batch_size, ctx.transform.crop)
    total = scaled(step, settings.steps, targets)
    line = f"{what}: about {duration(total)} on this CPU (one step timed: {step:.2f} s)"
    quick = fv_settings.PRESETS["quick"]
    if any(getattr(settings, k) > quick[f"fv_{k}"] for k in ("size", "steps", "crops")):
        q = timed(ctx, first, quick["fv_size"], quick["fv_crops"], settings.batch_size, ctx.transform.crop)
        line += (f"; --fv_preset quick ({fv_settings.preset_flags('quick')}) takes about "
                 f"{duration(scaled(q, quick['fv_steps'], targets))}")
    print(line, flush=True)
    return total
