"""Train a demo CNN (``--arch cnn``, the default, or ``resnet``) on the generated shapes, deterministically on the CPU.

The training images are read once through the paper's evaluation transform (the same images the
stage scripts will see), passed through the net's parameter-free 4 x 4 average pool, and kept in
memory; training then runs on those 56 x 56 tensors with random flips and quarter turns (the
classes do not change under them). Seeds fix the initialisation, the batch order and the
augmentation, and torch's deterministic algorithms are switched on while it trains (demo/training.py's
loop, which restores the caller's settings), so a rerun on the same machine gives the same weights. Another CPU (or another number of threads) rounds differently, and
training amplifies the differences: the weights, and which channel the demo picks, can change.

Training adds an auxiliary linear classifier on the spatially averaged input of the layer of
interest (``--aux_weight`` times its cross-entropy joins the loss; the classifier is dropped
afterwards, the saved net is the plain ShapesCNN or ShapesResNet). It makes the 64 inputs of the layer
class-specific, as the features of a large ImageNet model are, instead of part-like (a detector of
uniform colour also fires inside wide stripes). The 4 channels of the layer still have to serve
9 classes, so training still makes them polysemantic; but the two classes of such a channel now
reach it through different inputs, which is what the split needs. Without it (``--aux_weight 0``)
the weaker separation of the demo's split fell to about 2.3 for some seeds and thread counts.

Command line: python -m demo.train --data_dir DATA --out model.pth [--arch cnn|resnet] [--epochs N] [--seed S]
              [--aux_weight W] [--threads N]
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from demo import training
from demo.networks import SHAPES_ARCHS as ARCHS, SHAPES_CLASSES as NUM_CLASSES
from utils.data import folders as udata
from utils.files import names


def load_split(data_dir, split, model, batch_size=64, num_workers=None):
    """(pooled images (N, 3, 56, 56) float32, labels (N,)) of one split, via the evaluation transform."""
    ds = udata.image_folder(data_dir, split)
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    xs, ys = [], []
    with torch.no_grad():
        for images, labels in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers):
            xs.append(model.downsample(images))
            ys.append(labels)
    return torch.cat(xs), torch.cat(ys), ds.classes


def augment(x, gen):
    """Random horizontal flip and quarter turn per batch (deterministic given ``gen``)."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (), generator=gen))
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def accuracy(model, x, y, batch_size=256):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model.forward_downsampled(x[i:i + batch_size]).argmax(1)
                          for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


AUX_WEIGHT = 2.0
# a fixed thread count (not one per core): the count changes how sums are split, hence the rounding and the
# weights, so machines with different numbers of cores train alike (1 thread where torch has only 1 core)
THREADS = 2


class ShapesJob(training.Job):
    """The shapes demo's training (``training.train``): the pooled images, the auxiliary classifier's loss."""

    def __init__(self, data_dir, out, arch, aux_weight, epochs, seed, log):
        self.data_dir, self.out, self.arch, self.aux_weight, self.epochs, self.seed, self.log = (
            data_dir, out, arch, aux_weight, epochs, seed, log)
        self.loss_fn = nn.CrossEntropyLoss()

    def prepare(self):
        self.start = time.time()
        model = ARCHS[self.arch]()
        # training only: a linear classifier on the spatially averaged input of the layer of interest
        self.aux = nn.Linear(model.layer_of_interest.in_channels, NUM_CLASSES)
        x, y, self.classes = load_split(self.data_dir, "train", model)
        self.xv, self.yv, _ = load_split(self.data_dir, "val", model)
        if len(self.classes) != NUM_CLASSES:
            raise SystemExit(f"{self.data_dir} has {len(self.classes)} classes, the demo model expects {NUM_CLASSES}")
        self.log(f"loaded {len(x)} train and {len(self.xv)} val images in {time.time() - self.start:.1f} s")
        params = list(model.parameters()) + (list(self.aux.parameters()) if self.aux_weight else [])
        return model, params, x, y

    def loss(self, net, x, y, gen):
        logits, feats = net.logits_and_layer_input(augment(x, gen))
        loss = self.loss_fn(logits, y)
        if self.aux_weight:
            loss = loss + self.aux_weight * self.loss_fn(self.aux(feats.mean((2, 3))), y)
        return loss

    def epoch_done(self, net, epoch, loss, seconds):
        if epoch == self.epochs - 1 or epoch % 5 == 4:
            self.log(f"epoch {epoch + 1}/{self.epochs}: loss {loss:.3f}, val accuracy "
                     f"{accuracy(net, self.xv, self.yv):.3f}")

    def finish(self, net, x, y):
        summary = {"arch": self.arch, "epochs": self.epochs, "seed": self.seed, "aux_weight": self.aux_weight,
                   "threads": torch.get_num_threads(), "train_images": len(x), "val_images": len(self.xv),
                   "train_accuracy": accuracy(net, x, y), "val_accuracy": accuracy(net, self.xv, self.yv),
                   "seconds": round(time.time() - self.start, 1), "classes": self.classes}
        out = self.out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(net.state_dict(), out)
        with open(names.training_record(out), "w") as f:
            json.dump(summary, f, indent=1)
        self.log(f"trained in {summary['seconds']} s: train accuracy {summary['train_accuracy']:.3f}, "
                 f"val accuracy {summary['val_accuracy']:.3f}; saved {out}")
        return summary


def train(data_dir, out, epochs=12, seed=0, batch_size=64, lr=4e-3, weight_decay=1e-4, aux_weight=AUX_WEIGHT,
          threads=None, log=print, arch="cnn"):
    """Train the demo net ``arch`` (demo.networks.SHAPES_ARCHS) on ``data_dir/train``, save its state dict to
    ``out`` (and ``<out>_training.json``); returns a summary dict.

    ``aux_weight``: weight of the auxiliary classifier on the layer's input (0: none; see the module doc).
    ``threads``: torch's intra-op threads while training (None: THREADS, or fewer if torch has fewer); the
    caller's thread count and deterministic setting are restored afterwards.
    """
    job = ShapesJob(data_dir, out, arch, aux_weight, epochs, seed, log)
    recipe = training.Recipe(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, pct_start=0.2)
    return training.train(job, recipe, seed, min(THREADS, torch.get_num_threads()) if threads is None else threads)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True, help="state-dict file to write")
    p.add_argument("--arch", choices=sorted(ARCHS), default="cnn", help="demo net (default cnn)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux_weight", type=float, default=AUX_WEIGHT,
                   help=f"weight of the auxiliary classifier on the layer's input (default {AUX_WEIGHT}; 0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads while training (default {THREADS}, or 1 on a one-core machine)")
    a = p.parse_args()
    train(a.data_dir, a.out, a.epochs, a.seed, aux_weight=a.aux_weight, threads=a.threads, arch=a.arch)


if __name__ == "__main__":
    main()
