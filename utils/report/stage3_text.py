"""What stage 3 prints for one job: the concepts, the score table, both best-rho choices, the degeneracy
warning and both exactness checks (lines of text; the stage prints them)."""
import torch

from utils.method.split import RHOS, TOLERANCE, split_sources_k

TOL = f"{TOLERANCE:.0e}".replace("e-0", "e-")  # 1e-4


def score_number(s):
    """A score in at most 8 characters whatever its size: 2 decimals up to 9999.99, else 3 significant digits."""
    return f"{s:.2f}" if abs(s) < 9999.995 else f"{s:.2e}"


def score_table(rhos, scores, robust):
    """Three aligned lines: rho, the published score and the robust score of each rho (columns as wide as the
    widest number, so that any score fits)."""
    cols = [[str(r), score_number(a), score_number(b)] for r, a, b in zip(rhos, scores, robust)]
    width = max(5, max(len(x) for col in cols for x in col))
    return [f"{head:<7}" + " ".join(f"{col[i]:>{width}}" for col in cols)
            for i, head in enumerate(("rho", "score", "robust"))]


def choice_lines(res, run):
    """The two choices of rho and, where the published one is degenerate, the warning."""
    pub, rob, dead = run["published_best"], run["robust_best"], run["dead"]

    def dead_text(r):
        return "/".join(f"{100 * float(d):.0f}%" for d in dead[r])
    lines = [f"rho choices: published rho = {RHOS[pub]} (score {float(res.scores[pub]):.4g}; own map dead on "
             f"{dead_text(pub)} of each concept's images), robust rho = {RHOS[rob]} (score "
             f"{float(run['robust'][rob]):.4f}; dead on {dead_text(rob)}); ..._f_best is the {run['rho_score']} "
             f"choice"]
    if run["degenerate"]:
        worst = int(torch.argmax(dead[pub]))
        lines.append(f"warning: the published choice rho = {RHOS[pub]} is degenerate: concept {worst + 1}'s own map "
                     f"D{worst + 1} has no positive activation on {100 * float(dead[pub, worst]):.0f}% of its "
                     f"{res.images[worst]} images (robust choice: rho = {RHOS[rob]}, --rho_score robust)")
    return lines


def exactness_lines(channel, k, res, run):
    """The split's maps against the layer's output, and the logits against the original network's."""
    merged = " + ".join(f"D{j}" for j in range(1, k + 1)) + (" - R" if k == 2 else f" - {k - 1} R")
    return [f"exactness on the {sum(res.images)} images scored: max |{merged} - channel {channel}'s map| "
            f"= {res.max_map_diff:.3g} over all 20 rho (max |map| {res.max_abs_map:.3g}, tolerance "
            f"{TOL} relative): {'OK' if run['maps_ok'] else 'FAILED'}",
            f"exactness check on the first {run['logit_images']} training images: max |logit difference| = "
            f"{run['logit_diff']:.3g} (max |logit| {run['logit_max']:.3g}, tolerance {TOL} relative): "
            f"{'OK, same function' if run['logits_ok'] else 'FAILED'}"]


def header_line(concepts):
    """``=== FILE line 3: channel c, classes ...``: the line that opens a job's output in a run of several jobs."""
    return f"=== {concepts.where}: channel {concepts.channel}, classes {concepts.describe()}"


def job_lines(layer_path, names, job, header=False):
    """Everything printed for a job of stage 3 (``utils.stages.stage3.Job``: its concepts, counts (training
    images per concept), res (SplitScores), run (the ``choose`` dict with the network check) and arvs (k ARVs));
    ``header``: a first line naming the triples file's line. ``names``: the class folder names."""
    t, counts, res, run, v = job.concepts, job.counts, job.res, job.run, job.arvs
    c, best, k = t.channel, run["best"], len(counts)
    src = split_sources_k(torch.stack(v), RHOS[best])
    lines = [header_line(t)] if header else []
    lines.append(f"channel {c} of layer '{layer_path}': " + ", ".join(
        f"concept {j} = {t.label(names, j)} ({counts[j - 1]} train images)" for j in range(1, k + 1)))
    lines += score_table(RHOS, res.scores.tolist(), run["robust"].tolist())
    chosen = res.scores[best] if run["rho_score"] == "published" else run["robust"][best]
    goes = ", ".join(f"{int(src[j].sum())} to concept {j + 1}" for j in range(1, k))
    lines.append(f"best rho = {RHOS[best]} (score {float(chosen):.4f}); {int(src[0].sum())} input channels go to "
                 f"concept 1, {goes}, {len(v[0]) - int(src.sum())} to {'both' if k == 2 else 'all'}")
    return lines + choice_lines(res, run) + exactness_lines(c, k, res, run)
