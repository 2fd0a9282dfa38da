"""Train a demo CNN (``--arch cnn``, the default, or ``resnet``) on the generated shapes, deterministically on the CPU.

The training images are read once through the paper's evaluation transform (the same images the
stage scripts will see), passed through the net's parameter-free 4 x 4 average pool, and kept in
memory; training then runs on those 56 x 56 tensors with random flips and quarter turns (the
classes do not change under them). Seeds fix the initialisation, the batch order and the
augmentation, and torch's deterministic algorithms are switched on, so a rerun on the same
machine gives the same weights. Another CPU (or another number of threads) rounds differently, and
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

from demo.model import ARCHS, NUM_CLASSES
from utils.data import folders as udata


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


def train(data_dir, out, epochs=12, seed=0, batch_size=64, lr=4e-3, weight_decay=1e-4, aux_weight=AUX_WEIGHT,
          threads=None, log=print, arch="cnn"):
    """Train the demo net ``arch`` (demo.model.ARCHS) on ``data_dir/train``, save its state dict to ``out``;
    returns a summary dict.

    ``aux_weight``: weight of the auxiliary classifier on the layer's input (0: none; see the module doc).
    ``threads``: torch's intra-op threads while training (None: THREADS, or fewer if torch has fewer).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(min(THREADS, previous) if threads is None else threads)
    try:
        return _train(data_dir, out, epochs, seed, batch_size, lr, weight_decay, aux_weight, log, arch)
    finally:
        torch.set_num_threads(previous)


def _train(data_dir, out, epochs, seed, batch_size, lr, weight_decay, aux_weight, log, arch):
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    model = ARCHS[arch]()
    # training only: a linear classifier on the spatially averaged input of the layer of interest
    aux = nn.Linear(model.layer_of_interest.in_channels, NUM_CLASSES)
    x, y, classes = load_split(data_dir, "train", model)
    xv, yv, _ = load_split(data_dir, "val", model)
    if len(classes) != NUM_CLASSES:
        raise SystemExit(f"{data_dir} has {len(classes)} classes, the demo model expects {NUM_CLASSES}")
    log(f"loaded {len(x)} train and {len(xv)} val images in {time.time() - start:.1f} s")
    gen = torch.Generator().manual_seed(seed + 1)
    params = list(model.parameters()) + (list(aux.parameters()) if aux_weight else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            logits, feats = model.logits_and_layer_input(augment(x[idx], gen))
            loss = loss_fn(logits, y[idx])
            if aux_weight:
                loss = loss + aux_weight * loss_fn(aux(feats.mean((2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch == epochs - 1 or epoch % 5 == 4:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}, val accuracy {accuracy(model, xv, yv):.3f}")
    model.eval()
    summary = {"arch": arch, "epochs": epochs, "seed": seed, "aux_weight": aux_weight, "threads": torch.get_num_threads(),
               "train_images": len(x), "val_images": len(xv),
               "train_accuracy": accuracy(model, x, y), "val_accuracy": accuracy(model, xv, yv),
               "seconds": round(time.time() - start, 1), "classes": classes}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(model.state_dict(), out)
    with open(os.path.splitext(out)[0] + "_training.json", "w") as f:
        json.dump(summary, f, indent=1)
    log(f"trained in {summary['seconds']} s: train accuracy {summary['train_accuracy']:.3f}, "
        f"val accuracy {summary['val_accuracy']:.3f}; saved {out}")
    return summary


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
