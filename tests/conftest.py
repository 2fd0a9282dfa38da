"""Shared fixtures: a generated ImageFolder and helpers to run the stage scripts as a user would."""
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from tests.digests import threads_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable: pytest.ini's pythonpath

NUM_CLASSES = 4
# torch's intra-op threads of a fresh process (OMP_NUM_THREADS, else the CPU count): what ``run_stage`` gives a
# script, as ``run_script``'s new process has, whatever an earlier test set
FRESH_THREADS = torch.get_num_threads()


def make_image_folder(root, train_per_class=6, val_per_class=4, num_classes=NUM_CLASSES, seed=0, size=(40, 48)):
    """ImageFolder with train/ and val/ of ``num_classes`` classes of random JPEG images (class-dependent tint)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            tint = rng.random(3)
            for i in range(n):
                img = rng.random(size + (3,)) * 0.6 + tint * 0.4
                Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(d, f"img{i:03d}.jpg"))
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


# the demo at the sizes the tests use: tests/test_demo.py (seeds 0 and 1) and tests/test_demo_resnet.py
DEMO_CNN = ["--train_per_class", "60", "--val_per_class", "15"]
DEMO_RESNET = ["--arch", "resnet", "--train_per_class", "40", "--val_per_class", "10", "--epochs", "8",
               "--no_feature_vis", "--no_atlas", "--seed", "0", "--num_workers", "0"]
# arch -> (a copy of the demo's folder as the demo left it, the folder, the flags, stdout): other tests add files
# to the folder; tests/test_house_plan.py compares the copy with the digests of an older commit's run
PRISTINE = {}


def demo_process(out, args, tree=ROOT):
    """``python -m demo.run_demo --out OUT ARGS`` with the code of ``tree`` and digests.THREADS torch threads (the
    count the checked-in digests were made with; training has its own fixed count); returns the CompletedProcess."""
    env = threads_env(dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", "")))
    return subprocess.run([sys.executable, "-m", "demo.run_demo", "--out", out, *args], cwd=tree, env=env,
                          capture_output=True, text=True)


def _demo(out, args, key=None):
    """The demo into ``out`` (asserting it ran); with ``key``, its folder copied into PRISTINE. (report, stdout)."""
    proc = demo_process(out, args)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    if key is not None:
        shutil.copytree(out, out + "_pristine", symlinks=True)
        PRISTINE[key] = (out + "_pristine", out, list(args), proc.stdout)
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f), proc.stdout


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """run(seed) -> (out, report, stdout) of the reduced demo, each seed run once per session (seed 0 with the
    feature visualizations and the atlas)."""
    done = {}

    def run(seed):
        if seed not in done:
            out = str(tmp_path_factory.mktemp(f"demo_out_seed{seed}"))
            more = [] if seed == 0 else ["--no_feature_vis", "--no_atlas"]  # the feature visualizations once
            rep, stdout = _demo(out, [*DEMO_CNN, "--seed", str(seed), *more], "cnn" if seed == 0 else None)
            done[seed] = (out, rep, stdout)
        return done[seed]
    return run


@pytest.fixture(scope="session")
def resnet_demo(tmp_path_factory):
    """(out, report) of the reduced demo in the ResNet layout, once per session."""
    out = str(tmp_path_factory.mktemp("demo_resnet"))
    return out, _demo(out, DEMO_RESNET, "resnet")[0]


# runs (script, args) calls of a tree one after the other in one process (one import of torch):
# python -c DRIVER TREE JSON_CALLS [FOLDER]; each call's command line goes to stdout, its seconds to stderr; the
# calls run in FOLDER (default: TREE)
DRIVER = """
import json, os, runpy, sys
tree, calls = sys.argv[1], json.loads(sys.argv[2])
os.chdir(sys.argv[3] if len(sys.argv) > 3 else tree)
import time
for script, args in calls:
    print(f"$ {script} {' '.join(args)}", flush=True)
    start = time.time()
    sys.argv = [os.path.join(tree, script)] + args
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    sys.stdout.flush()
    print(f"{time.time() - start:.1f} s  {script} {' '.join(args[-6:])}", file=sys.stderr)
"""


def run_script(script, *args, cwd=None, check=True):
    """Run a stage script through its command line; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_inproc(script, *args, cwd=None, env=None, threads=None):
    """Run ``script`` as ``__main__`` in this process (``runpy``, ``sys.argv`` set, stdout and stderr captured, the
    ``SystemExit`` code taken, an exception's traceback on stderr): the code path of ``python script.py ...``
    without a new interpreter's ~3 s of ``import torch``. ``threads``: torch's thread count for the run, set back
    afterwards (None: the count is left to the script). Returns a CompletedProcess-like object."""
    out, err = io.StringIO(), io.StringIO()
    path = os.path.join(ROOT, script)
    saved_argv, saved_cwd, saved_threads = sys.argv, os.getcwd(), torch.get_num_threads()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    code = 0
    try:
        sys.argv = [path, *map(str, args)]
        if threads is not None:
            torch.set_num_threads(threads)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # what a subprocess would print as a traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if threads is not None:
            torch.set_num_threads(saved_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())


def run_stage(script, *args, cwd=None, check=True):
    """``run_script`` in this process (``run_inproc``): for tests about what a script computes, not about its
    process (exit status and stderr of a real process, signals, torchrun keep ``run_script``).
    The script gets a fresh process's torch thread count (``FRESH_THREADS``), whatever an earlier test set.
    ``CLI_TESTS_SUBPROCESS=1`` runs these as subprocesses too."""
    if os.environ.get("CLI_TESTS_SUBPROCESS") == "1":
        return run_script(script, *args, cwd=cwd, check=check)
    proc = run_inproc(script, *args, cwd=cwd, threads=FRESH_THREADS)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_bytes(folder):
    """{relative path: bytes} of every file below ``folder``: to check nothing was changed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out
