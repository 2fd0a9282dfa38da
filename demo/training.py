"""One training loop for the demos' nets (demo/networks.py), deterministic on the CPU.

Both demos train alike: the training images as tensors in memory, ``torch.manual_seed(seed)`` before the net is
built (its initialisation), one generator seeded with ``seed + 1`` for the batch order and the augmentation,
AdamW with a one-cycle learning rate, a fixed number of torch threads and torch's deterministic algorithms. A
rerun on the same machine gives the same weights. Another CPU (or another thread count) rounds differently, and
training amplifies the differences: the weights, and the channels the method finds, can change.

``train(job, recipe, seed, threads)`` sets the threads and the deterministic algorithms only while it runs
(``deterministic``) and restores the caller's settings afterwards, also on an error. What differs between the
demos is a ``Job``: what it trains on (``prepare``), the loss of one batch (``loss``, which draws its
augmentation from the generator), what it says after an epoch (``epoch_done``) and what it keeps of the trained
net (``finish``: accuracies, the saved state dict). The shapes demo's job is ``shapes_job``
(``demo/train.py``), Fashion-MNIST's ``fashion_job`` (``demo/fashion_model.py``).

Per epoch: ``order = randperm(N, generator)``; for each batch of ``order``: loss, ``zero_grad``, ``backward``,
AdamW step, one-cycle step (``epochs * ceil(N / batch_size)`` steps in all, the peak at ``pct_start``).
"""
import contextlib
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm


@contextlib.contextmanager
def deterministic(threads):
    """``threads`` torch intra-op threads and torch's deterministic algorithms for the block; the previous thread
    count and deterministic setting after it (also when the block raises)."""
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)


@dataclass(frozen=True)
class Recipe:
    """The optimizer's settings: ``epochs`` over the training tensors in batches of ``batch_size``, AdamW with
    ``lr`` (the one-cycle peak, reached after ``pct_start`` of the steps) and ``weight_decay``."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    pct_start: float


class Job:
    """What one demo trains and keeps; ``train`` calls these in order, under the training settings."""

    def prepare(self):
        """After ``torch.manual_seed(seed)``: (net, the parameters AdamW updates, x (N, ...), y (N,))."""
        raise NotImplementedError

    def loss(self, net, x, y, gen):
        """The loss of one batch ``x`` (B, ...), ``y`` (B,) (its augmentation drawn from ``gen``)."""
        raise NotImplementedError

    def epoch_done(self, net, epoch, loss, seconds):
        """After epoch ``epoch`` (from 0) with mean loss ``loss``: a log line, or nothing."""

    def finish(self, net, x, y):
        """With ``net`` in eval mode, still under the training settings: the summary (and the saved weights)."""
        raise NotImplementedError


def batches(n, batch_size):
    """Batches of an epoch: ceil(n / batch_size)."""
    return (n + batch_size - 1) // batch_size


def train(job, recipe, seed, threads, desc="epoch"):
    """Train ``job``'s net with ``recipe`` deterministically on ``threads`` torch threads; returns
    ``job.finish(...)``. The caller's thread count and deterministic setting are restored afterwards."""
    with deterministic(threads):
        torch.manual_seed(seed)
        net, params, x, y = job.prepare()
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, pct_start=recipe.pct_start,
                                                    total_steps=recipe.epochs * batches(len(x), recipe.batch_size))
        for epoch in range(recipe.epochs):
            start = time.time()
            net.train()
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in tqdm(range(0, len(x), recipe.batch_size), desc=f"{desc} {epoch + 1}/{recipe.epochs}",
                          unit="batch", dynamic_ncols=True, leave=False):
                idx = order[i:i + recipe.batch_size]
                loss = job.loss(net, x[idx], y[idx], gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            job.epoch_done(net, epoch, total / len(x), time.time() - start)
        net.eval()
        return job.finish(net, x, y)
