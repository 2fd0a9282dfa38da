r"""Feature visualization (MACO) of a channel and of its disentangled maps: the optimization, and where on a
val image a target looks.

Image t serves target t (``objectives``); each step draws random crops of every image (``transform``), sends
them through the model up to the layer only, and takes one NAdam step on the phases (``param``) against
    loss = - sum_t mean over the crops of image t of T_t,
so the targets of a run are optimized together and all crops share the model's batches.
``visualize_many`` runs several such groups in one loop, their crops laid end to end in the model's batches,
each group with its own generator and NAdam (its images: those of its own run, up to float rounding).
The transparency map is sum over steps of |d loss / d img|; ``faded`` shows the image faded to white by it
(mean over colours, clipped at its 80th percentile, / max). A target's val crop is a box of the layer's
receptive field around its map's maximum (``receptive_field``, ``rf_box``).

A run is given as two frozen objects and its targets: ``ModelInput`` (the model, the layer, and how an image
reaches the model: crop size, resize, normalization, device) and ``Maco`` (the optimization: the spectrum,
image side, steps, crops, NAdam learning rate, crops per forward, crop scale, progress bar); the targets of a
group are (weights (T, C_in, kh, kw), bias (T,) or None, seed).
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from utils.data import folders
from utils.featurevis.objectives import Targets, target_values
from utils.featurevis.param import maco_image, unit_color_matrix
from utils.featurevis.transform import CROP_SCALE, crop_boxes, crops_of, full_view, noise_draws, normalize, with_noise
from utils.model.tap import layer_input_with_grad

INPUT_SIZE = folders.CROP  # the evaluation transform's crop: what the model is fed
RESIZE = folders.RESIZE    # ... after resizing the shorter side to this


@dataclass(frozen=True, eq=False)
class ModelInput:
    """The model a visualization is seen through: ``model`` (on ``device``), the ``layer`` whose input the
    targets read, and how an image reaches the model: centre crop ``input_size`` after resizing the shorter side
    to ``resize`` (None: in the paper's proportion, 256 for 224; only ``activation_matrix`` resizes),
    normalized with ``mean`` and ``std``; ``device`` where the optimization runs."""
    model: object
    layer: object
    input_size: int = INPUT_SIZE
    resize: int = None
    mean: tuple = folders.MEAN
    std: tuple = folders.STD
    device: object = "cpu"


@dataclass(frozen=True, eq=False)
class Maco:
    """The settings of one MACO optimization: the spectrum (magnitude (3, S, S // 2 + 1), colour matrix q (3, 3):
    ``utils.featurevis.spectrum``), the image side ``size`` S, ``steps``, ``crops`` per image and step, NAdam's
    ``lr``, at most ``batch_size`` crops per forward (None or 0: all of a step's crops at once), the crops'
    ``scale`` range (``transform.CROP_SCALE``) and whether to show a progress bar."""
    magnitude: torch.Tensor
    q: torch.Tensor
    size: int
    steps: int
    crops: int
    lr: float = 1.0
    batch_size: int = None
    scale: tuple = CROP_SCALE
    progress: bool = True


def activation_matrix(net, weights, bias, images):
    """A[v, t] = T_t on visualization v seen through the evaluation transform of ``net`` (a ``ModelInput``:
    resize, centre crop ``input_size``, normalize with ``mean`` and ``std``), no noise. weights (T, C_in, kh, kw),
    bias (T,) or None; images: (V, 3, S, S) in [0, 1] on the model's device -> (V, T)."""
    input_size = net.input_size
    resize = round(input_size * RESIZE / INPUT_SIZE) if net.resize is None else net.resize
    with torch.no_grad():
        view = full_view(images.float(), input_size, resize)
        x = layer_input_with_grad(net.model, net.layer, normalize(view, net.mean, net.std))
        return target_values(x.float(), net.layer, weights.to(x), None if bias is None else bias.to(x))


def visualize(net, weights, bias, seed, maco):
    """MACO for every target at once: ``net`` a ``ModelInput`` (the model, the layer and the model's input size
    and normalization), weights (T, C_in, kh, kw), bias (T,) or None, ``seed`` of the phases, crops and noise,
    ``maco`` the optimization's settings (``Maco``: spectrum magnitude (3, S, n) and q (3, 3), S, steps, ...).

    Image t is optimized for target t; at most ``maco.batch_size`` crops (default: all T * crops) go through
    the model at once. Returns dict(images (T, 3, S, S) in [0, 1], transparency (T, 3, S, S) = sum over
    steps of |d loss / d image|, loss (steps,) per-step mean target of each image's own crops (T,)), CPU.
    ``visualize_many`` of one group.
    """
    return visualize_many(net, [(weights, bias, seed)], maco)[0]


def visualize_many(net, groups, maco):
    """``visualize`` of several groups of targets in one loop: groups = [(weights (T_g, C_in, kh, kw), bias (T_g,)
    or None, seed)]; net: ``ModelInput``; maco: ``Maco``. Each step lays the crops of every group end to end and
    sends them through the model ``maco.batch_size`` at a time (default: all of them in one batch), so the groups
    share the model's batches; each group keeps its own generator (phases, crop boxes and noise drawn in the
    order and shapes of ``visualize`` for that group alone) and its own NAdam. A group's result is therefore that
    of ``visualize`` up to the float rounding of the model's batched convolutions (bit-equal for one group).
    Returns one dict per group, as ``visualize`` does.
    """
    size, crops, batch_size, input_size = maco.size, maco.crops, maco.batch_size, net.input_size
    device = torch.device(net.device)
    m = maco.magnitude.to(device, torch.float32)
    qu = unit_color_matrix(maco.q.double()).float().to(device)
    state = [_Group(Targets(net.layer, w, b).on(device), seed, m, size, maco.lr, device) for w, b, seed in groups]
    limit = sum(g.count for g in state) * crops if not batch_size else max(1, int(batch_size))
    forwards = _segments([g.count * crops for g in state], limit)
    view = (input_size, net.mean, net.std)
    for _ in tqdm(range(maco.steps), desc="feature visualization", unit="step", disable=not maco.progress,
                  dynamic_ncols=True):
        for g in state:
            g.begin_step(m, qu, crops, size, maco.scale, batch_size, input_size)
        for seg in forwards:
            _batch_backward(net.model, net.layer, state, seg, view, crops)
        for g in state:
            g.end_step(crops)
    return [g.result(m, qu) for g in state]


def runs_of_targets(counts, limit):
    """Consecutive jobs of ``counts`` targets each, gathered into optimizations of at most ``limit`` targets (a
    job over the limit alone; limit 0: every job alone). Returns [[job index, ...] per optimization]."""
    runs, total = [], 0
    for i, n in enumerate(counts):
        if runs and limit and total + n <= limit:
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


class _Group:
    """One group of ``visualize_many``: its objective (``objectives.Targets``), generator, phases (drawn first
    from the generator), NAdam, transparency and loss history; per step its image, the leaf whose gradient the
    crops fill, its crop boxes, the noise of its crops and each image's sum of its own target over its crops."""

    def __init__(self, objective, seed, m, size, lr, device):
        self.count = objective.count
        self.objective = objective
        self.gen = torch.Generator(device=device).manual_seed(int(seed))
        self.phase = torch.randn((self.count,) + tuple(m.shape), generator=self.gen, device=device).requires_grad_(True)
        self.opt = torch.optim.NAdam([self.phase], lr=lr)
        self.transparency = torch.zeros((self.count, 3, size, size), device=device)
        self.history = []

    def begin_step(self, m, qu, crops, size, scale, batch_size, input_size):
        self.opt.zero_grad()
        self.img = maco_image(m, self.phase, qu)
        self.leaf = self.img.detach().requires_grad_(True)
        self.boxes = crop_boxes(self.count, crops, size, self.gen, scale)
        chunk = self.count * crops if not batch_size else max(1, int(batch_size))
        self.noise = _Noise(self.gen, len(self.boxes), chunk, (3, input_size, input_size), self.leaf.dtype)
        self.own_sum = torch.zeros(self.count, dtype=torch.float64)

    def end_step(self, crops):
        self.transparency += self.leaf.grad.abs()
        self.img.backward(self.leaf.grad)
        self.opt.step()
        self.history.append((self.own_sum / crops).tolist())

    def result(self, m, qu):
        with torch.no_grad():
            final = maco_image(m, self.phase, qu)
        return {"images": final.detach().cpu(), "transparency": self.transparency.cpu(), "history": self.history}


class _Noise:
    """A group's noise of one step, drawn from its generator in the pieces of ``chunk`` crops that ``visualize``
    draws (``transform.noise_draws``), handed out in consecutive ranges of crops whatever the batches are."""

    def __init__(self, gen, n, chunk, shape, dtype):
        self.gen, self.n, self.chunk, self.shape, self.dtype = gen, n, chunk, shape, dtype
        self.lo = self.hi = 0
        self.draws = None

    def take(self, a, b):
        """(g, u) of crops a..b-1 (a: where the last range ended), each (b - a, *shape)."""
        parts = []
        while a < b:
            if a >= self.hi:
                self.lo, self.hi = self.hi, min(self.n, self.hi + self.chunk)
                self.draws = noise_draws((self.hi - self.lo,) + self.shape, self.dtype, self.gen)
            end = min(b, self.hi)
            parts.append([d[a - self.lo:end - self.lo] for d in self.draws])
            a = end
        return tuple(p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts))


def _segments(counts, limit):
    """The forward batches of a step: the groups' crops (``counts`` per group) laid end to end, cut every
    ``limit`` crops. Returns [[(group, first crop, end crop), ...] per batch]."""
    batches, seg, room = [], [], limit
    for gi, n in enumerate(counts):
        a = 0
        while a < n:
            b = min(n, a + room)
            seg.append((gi, a, b))
            room, a = room - (b - a), b
            if room == 0:
                batches.append(seg)
                seg, room = [], limit
    return batches + ([seg] if seg else [])


def _batch_backward(model, conv, groups, seg, view, crops):
    """One forward and backward of the crops of ``seg`` (see ``_segments``): d loss / d leaf accumulates in each
    group's ``leaf.grad`` and each image's own target over its crops in its ``own_sum``. view: (input size,
    mean, std)."""
    input_size, mean, std = view
    inputs = [normalize(with_noise(crops_of(groups[gi].leaf, groups[gi].boxes[a:b], input_size),
                                   *groups[gi].noise.take(a, b)), mean, std) for gi, a, b in seg]
    x = layer_input_with_grad(model, conv, inputs[0] if len(inputs) == 1 else torch.cat(inputs))
    losses, lo = [], 0
    for gi, a, b in seg:
        g, bx = groups[gi], groups[gi].boxes[a:b]
        own = g.objective(x[lo:lo + b - a].float()).gather(1, bx[:, :1].long()).flatten()
        losses.append(-own.sum() / crops)
        g.own_sum.index_add_(0, bx[:, 0].long().cpu(), own.detach().double().cpu())
        lo += b - a
    (losses[0] if len(losses) == 1 else torch.stack(losses).sum()).backward()


def faded(image, transparency, percentile=80):
    """The visualization faded to white by its transparency: alpha = mean over colours, clipped at its
    ``percentile``-th percentile, / max; out = alpha * image + (1 - alpha).
    image, transparency: (3, S, S) arrays -> (S, S, 3) float array in [0, 1]."""
    img = np.asarray(image, dtype=np.float64).transpose(1, 2, 0)
    alpha = np.asarray(transparency, dtype=np.float64).mean(axis=0)
    alpha = np.minimum(alpha, np.percentile(alpha, percentile))
    alpha = alpha / max(alpha.max(), 1e-12)
    return alpha[..., None] * img + (1 - alpha[..., None])


def receptive_field(model, conv, input_size=INPUT_SIZE, device="cpu"):
    """Pixel extent (rf_h, rf_w) of one output position of ``conv`` near the centre, and the layer's output
    size (H', W'): the support of the input gradient of all channels at that position, on random images."""
    gen = torch.Generator().manual_seed(0)
    img = torch.randn((2, 3, input_size, input_size), generator=gen).to(device).requires_grad_(True)
    with torch.enable_grad():
        a = conv(layer_input_with_grad(model, conv, img))
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        (g,) = torch.autograd.grad(a[:, :, h, w].abs().sum(), img)
    support = g.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    rf = (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)) if len(rows) else (input_size, input_size)
    return rf, (a.shape[-2], a.shape[-1])


def rf_box(pos, map_size, rf, input_size=INPUT_SIZE):
    """Pixel box (x0, y0, x1, y1) of side ``rf`` centred on output position ``pos`` = (h, w) of a
    ``map_size`` grid laid over the input, moved to lie inside it."""
    box = []
    for p, n, r in ((pos[1], map_size[1], rf[1]), (pos[0], map_size[0], rf[0])):
        r = min(r, input_size)
        c = (p + 0.5) * input_size / n
        lo = int(round(min(max(c - r / 2, 0), input_size - r)))
        box.append((lo, lo + r))
    return box[0][0], box[1][0], box[0][1], box[1][1]
