"""Shared fixtures: a generated ImageFolder and helpers to run the stage scripts as a user would."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_CLASSES = 4


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


def run_script(script, *args, cwd=None, check=True):
    """Run a stage script through its command line; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True)
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
