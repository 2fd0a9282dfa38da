"""A small ResNet for Fashion-MNIST, and its deterministic training on the CPU.

The net takes the images the stage scripts give it: (N, 3, 28, 28), three equal colour channels (the
ImageFolder loader turns the grey PNGs into RGB), normalized with ``--mean 0.286 ... --std 0.353 ...``.
Its first step averages the three channels back into one (no parameters), so a feature visualization
optimizes a grey image. Then, ResNet-style (BatchNorm after every conv, ReLU after every add):

  stem     3x3 conv 1 -> 32                           28 x 28
  layer1   basic block 32 -> 32, stride 2             14 x 14
  layer2   basic block 32 -> 64, stride 2              7 x 7
  layer3   two bottleneck blocks 64 -> W, W -> W       7 x 7   (inner width 64)
  pool, linear W -> 10

The layer of interest is ``layer3.1.conv3``, the last 1x1 conv of the last bottleneck block, as the
paper's ``layer4.2.conv3`` in ResNet-50: it is followed by a BatchNorm (``bn3``), the identity residual
add and ReLU (``--head bn``, the default). The ``relu`` variant (``--head relu``) replaces the last block by
a 1x1 conv with bias followed directly by ReLU (no BatchNorm, no residual), as the demo's ``shapes_cnn``.
Either way it is the net's last Conv2d, so the stage scripts' default ``--layer_of_interest last_conv``
picks it. W (the width of the last stage and of the layer) is 16 or 32 here: fewer channels than there
are ways to tell ten classes apart, so channels have reason to serve several classes.

Factories (``--model demo.fashion_model:<name> --weights FILE``): fashion_resnet16, fashion_resnet32 (head
bn), fashion_relu16, fashion_relu32 (head relu).

Training (``train``): on the IDX arrays in memory, the same float32 pixels as the stage scripts' transform
(x / 255 - mean) / std, with random horizontal flips and shifts of up to 2 pixels (zero padding of the
raw image), AdamW and a one-cycle learning rate, a fixed seed and 2 torch threads with deterministic
algorithms: a rerun on the same machine gives the same weights. Another CPU rounds differently, and
training amplifies the differences: the weights, the accuracy's last digits and the channels the method
finds can change.

Command line: python -m demo.fashion_model --out model.pth [--arch fashion_resnet16] [--epochs N] [--seed S]
              [--train_per_class N] [--source DIR]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from demo import fashion_mnist  # noqa: E402
from utils.run import cli  # noqa: E402

NUM_CLASSES = 10
THREADS = 2


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut(x), -> ReLU (shortcut: 1x1 conv + BN when the shape
    changes, registered first so that the block's own convs come last in module order)."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv3 -> bn3, + shortcut(x), -> ReLU
    (ResNet-50's block; shortcut: identity, or 1x1 conv + BN when the width changes)."""

    def __init__(self, c_in, mid, c_out):
        super().__init__()
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
                         if c_in != c_out else nn.Identity())
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ReluHead(nn.Module):
    """The ``relu`` variant's last block: the bottleneck's 1x1 -> 3x3 part, then a 1x1 ``conv3`` with bias and
    ReLU (no BatchNorm, no residual)."""

    def __init__(self, c_in, mid, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.conv3(out))


class Grey(nn.Module):
    """(N, 3, H, W) -> (N, 1, H, W): the mean of the colour channels (the images' three channels are equal)."""

    def forward(self, x):
        return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


class FashionResNet(nn.Module):
    def __init__(self, width=16, head="bn", num_classes=NUM_CLASSES, mid=64):
        super().__init__()
        if head not in ("bn", "relu"):
            raise ValueError(f"head {head!r}: 'bn' or 'relu'")
        self.grey = Grey()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = BasicBlock(32, 32, stride=2)
        self.layer2 = BasicBlock(32, 64, stride=2)
        last = Bottleneck(width, mid, width) if head == "bn" else ReluHead(width, mid, width)
        self.layer3 = nn.Sequential(Bottleneck(64, mid, width), last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    @property
    def layer_of_interest(self):
        return self.layer3[1].conv3

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(self.grey(x)))))
        return self.fc(self.pool(x).flatten(1))


def fashion_resnet16():
    """``--model demo.fashion_model:fashion_resnet16``: layer of interest layer3.1.conv3, 16 channels, BN + add."""
    return FashionResNet(16, "bn")


def fashion_resnet32():
    """``--model demo.fashion_model:fashion_resnet32``: as fashion_resnet16 with 32 channels."""
    return FashionResNet(32, "bn")


def fashion_relu16():
    """``--model demo.fashion_model:fashion_relu16``: layer3.1.conv3 (16 channels, bias) followed by ReLU."""
    return FashionResNet(16, "relu")


def fashion_relu32():
    """``--model demo.fashion_model:fashion_relu32``: as fashion_relu16 with 32 channels."""
    return FashionResNet(32, "relu")


ARCHS = {f.__name__: f for f in (fashion_resnet16, fashion_resnet32, fashion_relu16, fashion_relu32)}
LAYER = "layer3.1.conv3"


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


def train(out, arch="fashion_resnet16", epochs=8, seed=0, batch_size=128, lr=4e-3, weight_decay=5e-4,
          train_per_class=None, source=None, threads=THREADS, log=print):
    """Train ``arch`` on the first ``train_per_class`` training images per class (None: all 60,000), save its
    state dict to ``out`` (and ``<out>_training.json``); returns the summary: accuracies on the training
    images and the 10,000 test images, seconds per epoch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out, arch, epochs, seed, batch_size, lr, weight_decay, train_per_class, source, log)
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(deterministic)


def _train(out, arch, epochs, seed, batch_size, lr, weight_decay, train_per_class, source, log):
    start = time.time()
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    images, labels = fashion_mnist.load_split("train", source)
    keep = fashion_mnist.first_per_class(labels, train_per_class)
    x, y = to_input(images[keep]), torch.as_tensor(labels[keep])
    test_images, test_labels = fashion_mnist.load_split("val", source)
    xt, yt = to_input(test_images), torch.as_tensor(test_labels)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    epoch_seconds = []
    for epoch in range(epochs):
        t = time.time()
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in tqdm(range(0, len(x), batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                      dynamic_ncols=True, leave=False):
            idx = order[i:i + batch_size]
            loss = loss_fn(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        epoch_seconds.append(round(time.time() - t, 1))
        left = (epochs - epoch - 1) * sum(epoch_seconds) / len(epoch_seconds)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f} ({epoch_seconds[-1]} s"
            + (f"; about {left:.0f} s left)" if epoch + 1 < epochs else ")"))
    model.eval()
    summary = {"arch": arch, "layer": LAYER, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
               "weight_decay": weight_decay, "threads": torch.get_num_threads(), "train_images": len(x),
               "test_images": len(xt), "train_accuracy": accuracy(model, x, y),
               "test_accuracy": accuracy(model, xt, yt),
               "epoch_seconds": epoch_seconds, "seconds": round(time.time() - start, 1)}
    from utils.files import atomic
    atomic.save_torch(out, model.state_dict())
    atomic.write_json(os.path.splitext(out)[0] + "_training.json", summary)
    log(f"trained in {summary['seconds']} s: train accuracy {summary['train_accuracy']:.4f}, "
        f"test accuracy {summary['test_accuracy']:.4f}; saved {out}")
    return summary


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
