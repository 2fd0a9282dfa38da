"""Fashion-MNIST's small ResNet (demo/networks.py, re-exported here under the ``--model demo.fashion_model:...``
names that stores, summaries and reports record) and its deterministic training on the CPU.

Factories (``--model demo.fashion_model:<name> --weights FILE``): fashion_resnet16, fashion_resnet32 (the layer
``layer3.1.conv3`` followed by BatchNorm, the residual add and ReLU), fashion_relu16, fashion_relu32 (the layer
with a bias, followed by ReLU only); the architecture is described in demo/networks.py.

Training (``train``, through demo/training.py's loop): on the IDX arrays in memory, the same float32 pixels as
the stage scripts' transform (x / 255 - mean) / std, with random horizontal flips and shifts of up to 2 pixels
(zero padding of the raw image), AdamW and a one-cycle learning rate, a fixed seed and 2 torch threads with
deterministic algorithms (the caller's settings are restored afterwards): a rerun on the same machine gives
the same weights. Another CPU rounds differently, and training amplifies the differences: the weights, the
accuracy's last digits and the channels the method finds can change.

Command line: python -m demo.fashion_model --out model.pth [--arch fashion_resnet16] [--epochs N] [--seed S]
              [--train_per_class N] [--source DIR]
"""
import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo import fashion_mnist, training
from demo.networks import (FASHION_ARCHS as ARCHS, FASHION_CLASSES as NUM_CLASSES, FASHION_LAYER as LAYER,  # noqa: F401
                           BasicBlock, Bottleneck, FashionResNet, Grey, ReluHead, fashion_relu16, fashion_relu32,
                           fashion_resnet16, fashion_resnet32)
from utils.files import atomic, names
from utils.run import cli

THREADS = 2


# ----------------------------------------------------------------------------- training
def to_input(images, mean=fashion_mnist.MEAN, std=fashion_mnist.STD):
    """uint8 (N, 28, 28) -> float32 (N, 3, 28, 28) as the stage scripts' transform makes them
    (ToTensor: x / 255; Normalize: (x - mean) / std; three equal channels)."""
    x = torch.as_tensor(np.array(images, dtype=np.uint8)).to(torch.float32).div(255).sub(mean).div(std)
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def augment(x, gen, shift=2):
    """Random horizontal flip and shift by up to ``shift`` pixels per image, filling with the background (the
    normalized value of a black pixel); deterministic given ``gen``. x: (B, 3, H, W)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    background = -fashion_mnist.MEAN / fashion_mnist.STD
    padded = F.pad(x, (shift, shift, shift, shift), value=background)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def accuracy(model, x, y, batch_size=500):
    """Share of ``x`` (N, 3, 28, 28) that ``model`` (in eval mode) classifies as ``y`` (N,)."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((pred == torch.as_tensor(y)).float().mean())


class FashionJob(training.Job):
    """Fashion-MNIST's training (``training.train``): the IDX arrays in memory, flips and shifts; the summary and
    the weights at ``out``."""

    def __init__(self, out, arch, recipe, seed, train_per_class, source, log):
        self.out, self.arch, self.recipe, self.seed, self.train_per_class, self.source, self.log = (
            out, arch, recipe, seed, train_per_class, source, log)
        self.loss_fn = nn.CrossEntropyLoss()
        self.epoch_seconds = []
        self.start = time.time()

    def prepare(self):
        model = ARCHS[self.arch]()
        images, labels = fashion_mnist.load_split("train", self.source)
        keep = fashion_mnist.first_per_class(labels, self.train_per_class)
        x, y = to_input(images[keep]), torch.as_tensor(labels[keep])
        test_images, test_labels = fashion_mnist.load_split("val", self.source)
        self.xt, self.yt = to_input(test_images), torch.as_tensor(test_labels)
        return model, model.parameters(), x, y

    def loss(self, net, x, y, gen):
        return self.loss_fn(net(augment(x, gen)), y)

    def epoch_done(self, net, epoch, loss, seconds):
        epochs = self.recipe.epochs
        self.epoch_seconds.append(round(seconds, 1))
        left = (epochs - epoch - 1) * sum(self.epoch_seconds) / len(self.epoch_seconds)
        self.log(f"epoch {epoch + 1}/{epochs}: loss {loss:.3f} ({self.epoch_seconds[-1]} s"
                 + (f"; about {left:.0f} s left)" if epoch + 1 < epochs else ")"))

    def finish(self, net, x, y):
        r = self.recipe
        summary = {"arch": self.arch, "layer": LAYER, "epochs": r.epochs, "seed": self.seed,
                   "batch_size": r.batch_size, "lr": r.lr, "weight_decay": r.weight_decay,
                   "threads": torch.get_num_threads(), "train_images": len(x), "test_images": len(self.xt),
                   "train_accuracy": accuracy(net, x, y), "test_accuracy": accuracy(net, self.xt, self.yt),
                   "epoch_seconds": self.epoch_seconds, "seconds": round(time.time() - self.start, 1)}
        atomic.save_torch(self.out, net.state_dict())
        atomic.write_json(names.training_record(self.out), summary)
        self.log(f"trained in {summary['seconds']} s: train accuracy {summary['train_accuracy']:.4f}, "
                 f"test accuracy {summary['test_accuracy']:.4f}; saved {self.out}")
        return summary


def train(out, arch="fashion_resnet16", epochs=8, seed=0, batch_size=128, lr=4e-3, weight_decay=5e-4,
          train_per_class=None, source=None, threads=THREADS, log=print):
    """Train ``arch`` on the first ``train_per_class`` training images per class (None: all 60,000), save its
    state dict to ``out`` (and ``<out>_training.json``); returns the summary: accuracies on the training
    images and the 10,000 test images, seconds per epoch. The caller's thread count and deterministic setting
    are restored afterwards."""
    recipe = training.Recipe(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, pct_start=0.25)
    job = FashionJob(out, arch, recipe, seed, train_per_class, source, log)
    return training.train(job, recipe, seed, threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="state-dict file to write")
    p.add_argument("--arch", choices=sorted(ARCHS), default="fashion_resnet16")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_per_class", type=int, default=None, help="training images per class (default all)")
    p.add_argument("--source", default=None, help=f"folder of the IDX files (default {fashion_mnist.SOURCE})")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"torch threads (default {THREADS}; another count rounds differently, as another CPU does)")
    a = p.parse_args(argv)
    train(a.out, a.arch, a.epochs, a.seed, train_per_class=a.train_per_class, source=a.source, threads=a.threads)


if __name__ == "__main__":
    cli.run(main)  # a missing data set: one line and exit status 2
