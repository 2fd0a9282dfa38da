"""Stage 2's advice when few or no candidates pass: what the layer offers at other thresholds, and a command.

Stage 2's thresholds (tau = 0.05 by default, the published code's, or the paper's 0.03; p = 0.75; the paper's
cosine below 0.5) were chosen for ResNet-50's last conv on ImageNet (1000 classes, 2048 channels). Another layer, model or data set can give no candidate at all there
while holding many at a lower tau or p. When fewer than ``FEW`` candidates pass, stage 2 prints one table over
a small grid (tau in ``GRID_TAUS``, p in ``GRID_PS``, and the user's own values):

  channels  the channels that use two or more classes (H_tau[y, c] >= p N_y for at least two classes y)
  pairs     the candidate pairs in the user's cosine window [low, high)
  any cos   the pairs of used classes with any cosine
  lowest    the lowest cosine among them

and the command line that would give a useful list: the strictest cell (largest tau, then largest p) with at
least ``FEW`` pairs in the window; else the strictest cell with ``FEW`` pairs of any cosine, the window opened
to [low, 1) (or [-1, 1) where the lowest cosine lies below low); else the cell with the most pairs.

Cost: the class means of the patch sums and the filter are stage 2's own; the histograms at the grid's tau
need one more read of the attributions (the store's smaller array; the patch sums are not read again), all
tau from that one read (``stage2_passes.class_histograms``). The grid's histograms use the published importance rule.
"""
import shlex

from utils.method import similarities
from utils.stages import stage2_passes

FEW = 5                        # fewer candidates than this: the advice is printed
GRID_TAUS = (0.01, 0.03, 0.05)
GRID_PS = (0.5, 0.75)
TOP_SUGGESTED = 20             # the --top N the advice names


def grid_values(tau, p):
    """The grid's tau and p values with the user's own added, each sorted: (taus, ps)."""
    return tuple(sorted(set(GRID_TAUS) | {tau})), tuple(sorted(set(GRID_PS) | {p}))


def suggestion(rows, low, high, few=FEW):
    """The (tau, p, low, high) to propose from ``similarities.threshold_grid``'s rows, or None where no cell of
    the grid has any pair (see the module docstring for the order of preference)."""
    def strictest(cells):
        return max(cells, key=lambda r: (r["tau"], r["p"]))
    in_window = [r for r in rows if r["pairs"] >= few]
    if in_window:
        r = strictest(in_window)
        return r["tau"], r["p"], low, high
    anywhere = [r for r in rows if r["pairs_any_cosine"] >= few]
    r = (strictest(anywhere) if anywhere else
         max(rows, key=lambda r: (r["pairs_any_cosine"], r["tau"], r["p"])))
    if r["pairs_any_cosine"] == 0:
        return None
    return r["tau"], r["p"], (low if r["lowest_cosine"] >= low else -1.0), 1.0


def table_lines(rows, tau, p):
    """The grid as text lines, the user's own cell marked."""
    lines = [f"{'tau':>5} {'p':>5} {'channels':>9} {'pairs':>7} {'any cos':>8} {'lowest':>7}"]
    for r in rows:
        lowest = "-" if r["lowest_cosine"] is None else f"{r['lowest_cosine']:.3f}"
        mark = "  <- this run" if (r["tau"], r["p"]) == (tau, p) else ""
        lines.append(f"{r['tau']:>5g} {r['p']:>5g} {r['channels']:>9} {r['pairs']:>7} {r['pairs_any_cosine']:>8} "
                     f"{lowest:>7}{mark}")
    return lines


def command_line(ctx, s, picked, top=None):
    """The stage-2 command line of the settings ``picked`` = (tau, p, low, high), for this store and layer;
    with ``top``, ``--top top`` in place of the cosine window."""
    t, p, low, high = picked
    words = ["python", "get_cosine_similarities.py", "--store_dir", s.store_dir, "--layer_of_interest",
             ctx.layer_path, "--proportion_attribution_required", f"{t:g}", "--p", f"{p:g}"]
    words += ["--top", top] if top else ["--cos_sim_low", f"{low:g}", "--cos_sim_high", f"{high:g}"]
    if s.out_dir != ".":
        words += ["--out_dir", s.out_dir]
    return " ".join(shlex.quote(str(w)) for w in words)


def advise(ctx, s, arrays, counts, means):
    """Print the grid table and the proposed command. arrays: the store's (attributions, labels); counts: (K,)
    N_y; means: (K, C_in, kh, kw) the class means of the patch sums. Returns the grid's rows."""
    A, targets = arrays
    taus, ps = grid_values(s.tau, s.p)
    print(f"fewer than {FEW} candidates: the layer at other thresholds (one more read of the attributions; the "
          f"paper's tau={GRID_TAUS[-1]}, p=0.75, cosine < 0.5 are for ResNet-50's last conv on ImageNet)")
    hists = stage2_passes.class_histograms(A, targets, len(counts), taus, s.chunk_rows, progress=True)
    rows = similarities.threshold_grid(hists, counts, ctx.conv.weight.detach(), means, ps, s.low, s.high,
                                       progress=stage2_passes.cosines_shown)
    rule = "" if s.sign == "published" else " (published importance rule)"
    print(f"channels: used by two or more classes; pairs: cosine in [{s.low}, {s.high}); any cos: pairs with any "
          f"cosine; lowest: their lowest cosine{rule}")
    print("\n".join(table_lines(rows, s.tau, s.p)))
    picked = suggestion(rows, s.low, s.high)
    if picked is None:
        print(f"no channel of '{ctx.layer_path}' uses two classes even at tau={taus[0]}, p={ps[0]}: try another "
              f"layer (--list_layers) or concepts without labels (--label_free)")
    else:
        print(f"for a list: {command_line(ctx, s, picked)}")
        print(f"or the {TOP_SUGGESTED} pairs of lowest cosine, whatever their cosine: "
              f"{command_line(ctx, s, picked, TOP_SUGGESTED)}")
    return rows
