"""The stage scripts as both demos run them (demo/run_demo.py, demo/run_fashion.py): through their command
lines, as a user would, one subprocess each, its output in ``OUT/logs/{key}.log``; and the files they write,
named by ``utils/files/names.py``.

``Runner(out)`` runs one script and keeps its command (``python SCRIPT ARGS``, as the report shows it) and its
seconds; ``Stages`` adds the flags every stage of a demo gets (data, model, weights, ...) and the stage calls
the demos make: stage 1 on the training images, stage 2's candidates, stages 3 and 4 on one pair of classes,
stage 2's label-free concepts. ``split_files`` names what stages 3 and 4 wrote for a pair.
"""
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from utils.files import names
from utils.model.loading import model_tag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean(out, made_here):
    """Remove the entries ``made_here`` of ``out`` (files or folders; each run starts clean)."""
    for name in made_here:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def short(text, n=8):
    """The last n lines of a script's output that are not progress bars or the long candidate list."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[{")]
    return "\n".join("  " + ln for ln in lines[-n:])


class Runner:
    """Runs the stage scripts as subprocesses, logging each one's output to OUT/logs/."""

    def __init__(self, out):
        self.out = out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.commands, self.seconds = {}, {}

    def run(self, key, script, args):
        """``python SCRIPT ARGS`` from the repository root; its stdout. A failure prints the end of its output and
        stops the demo (SystemExit naming the log)."""
        cmd = [sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args]
        shown = " ".join(["python", script] + [str(a) for a in args])
        self.commands[key] = shown
        print(f"\n$ {shown}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
        self.seconds[key] = round(time.time() - start, 1)
        log = os.path.join(self.logs, f"{key}.log")
        with open(log, "w") as f:
            f.write(f"$ {shown}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"{script} failed with exit status {proc.returncode} (log: {log})")
        return proc.stdout


@dataclass(frozen=True)
class SplitFiles:
    """What stages 3 and 4 write for one pair of classes of the model's default layer (``names``)."""
    run: str           # stage 4's run name: the best checkpoint's name without .pth
    checkpoint: str    # stage 3's best checkpoint
    info: str          # stage 3's info JSON
    scores: str        # stage 3's best-rho curve
    summary: str       # stage 4's summary JSON
    latest_plots: dict   # density_concept1, density_concept2, top_images: the latest run's copies
    own_plots: dict      # the same, the run's own
    feature_vis: str   # stage 4's feature-visualization record
    sae_view: str      # stage 4's SAE-view record


def split_files(out, store_dir, tag, channel, y1, y2):
    """The files of stages 3 and 4 on ``channel`` with concept 1 = class ``y1``, concept 2 = class ``y2``."""
    checkpoint = os.path.join(names.checkpoints_dir(store_dir), names.class_checkpoint(tag, channel, [[y1], [y2]],
                                                                                        names.BEST))
    run = names.run_name(checkpoint)
    plots = [names.density_plots(out, 1, "", run), names.density_plots(out, 2, "", run),
             names.top_images_plots(out, "", run)]
    keys = ("density_concept1", "density_concept2", "top_images")
    return SplitFiles(run=run, checkpoint=checkpoint, info=names.info_file(checkpoint),
                      scores=names.scores_plot(checkpoint), summary=names.summary(out, run),
                      latest_plots={k: p[0] for k, p in zip(keys, plots)},
                      own_plots={k: p[1] for k, p in zip(keys, plots)},
                      feature_vis=names.feature_vis_files(out, run, "")["record"],
                      sae_view=names.sae_view_files(out, run)["record"])


class Stages:
    """The stage calls of one demo run: ``common`` (the flags every stage gets: data, model, weights, ...), the
    store folder and the results folder ``out``. Each call returns the script's stdout."""

    def __init__(self, runner, common, store_dir, out, model):
        self.runner, self.common, self.store_dir, self.out = runner, list(common), store_dir, out
        self.tag = model_tag(model)

    def stage1(self):
        """Stage 1 on the training images into the store."""
        return self.runner.run("stage1", "get_importances_for_classes.py", self.common + ["--store_dir", self.store_dir])

    def stage2(self, tau, p, low, high):
        """Stage 2's candidates (cosine in [low, high)); the table goes under ``out``."""
        return self.runner.run("stage2", "get_cosine_similarities.py", self.common + [
            "--store_dir", self.store_dir, "--proportion_attribution_required", tau, "--p", p,
            "--cos_sim_low", low, "--cos_sim_high", high, "--out_dir", self.out])

    def candidates(self, tau, p, low, high):
        """Stage 2's candidates JSON of these settings."""
        return names.candidates_json(self.store_dir, names.candidates_base(self.tag, tau, p, low, high))

    def stage3(self, key, channel, y1, y2):
        """Stage 3: ``channel`` split into class ``y1`` (concept 1) and class ``y2`` (concept 2)."""
        return self.runner.run(key, "disentangle_channel.py", self.common + [
            "--store_dir", self.store_dir, "--channel_disentangle", channel] + pair(y1, y2))

    def stage4(self, key, channel, y1, y2, top_k, tau, extra=()):
        """Stage 4 on the split's best checkpoint: qualitative, quantitative (``tau``), the top ``top_k`` images;
        ``extra``: more flags (feature visualizations, the SAE view)."""
        return self.runner.run(key, "get_results.py", self.common + [
            "--model_dir", self.store_dir, "--channel_of_interest", channel] + pair(y1, y2) + [
            "--get_qualitative", "--get_quantitative", "--get_top_images", "--top_k", top_k,
            "--proportion_attribution_required", tau, "--out_dir", self.out] + list(extra))

    def label_free(self, channels, top_n):
        """Stage 2 ``--label_free`` on ``channels`` (a channel, or a comma-separated list)."""
        return self.runner.run("stage2_label_free", "get_cosine_similarities.py", self.common + [
            "--store_dir", self.store_dir, "--label_free", "--channels", channels, "--top_n", top_n])

    def concepts(self, top_n):
        """Stage 2's label-free concepts file."""
        return names.concepts_file(self.store_dir, self.tag, top_n)

    def split_files(self, channel, y1, y2):
        return split_files(self.out, self.store_dir, self.tag, channel, y1, y2)


def strongest_first(cands):
    """Stage 2's candidates, the lowest cosine first (ties: channel, then classes): the two classes that reach the
    channel through the most different inputs come first."""
    return sorted(cands, key=lambda d: (d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))


def pair(y1, y2):
    """The stage 3 and 4 flags of one class per concept."""
    return ["--classes_for_concept1", y1, "--classes_for_concept2", y2]
