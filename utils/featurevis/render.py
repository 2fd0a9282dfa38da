r"""Feature visualization (MACO) of a channel and of its disentangled maps: the optimization, and where on a
val image a target looks.

Image t serves target t (``objectives``); each step draws random crops of every image (``transform``), sends
them through the model up to the layer only, and takes one NAdam step on the phases (``param``) against
    loss = - sum_t mean over the crops of image t of T_t,
so the targets of a run are optimized together and all crops share the model's batches. The transparency map
is sum over steps of |d loss / d img|; ``faded`` shows the image faded to white by it (mean over colours,
clipped at its 80th percentile, / max). A target's val crop is a box of the layer's receptive field around its
map's maximum (``receptive_field``, ``rf_box``).
"""
import numpy as np
import torch
from tqdm import tqdm

from utils.data import folders
from utils.featurevis.objectives import target_values
from utils.featurevis.param import maco_image, unit_color_matrix
from utils.featurevis.transform import CROP_SCALE, add_noise, crop_boxes, crops_of, full_view, normalize
from utils.model.tap import layer_input_with_grad

INPUT_SIZE = folders.CROP  # the evaluation transform's crop: what the model is fed
RESIZE = folders.RESIZE    # ... after resizing the shorter side to this


def activation_matrix(model, conv, weights, bias, images, input_size=INPUT_SIZE, resize=None, mean=folders.MEAN,
                      std=folders.STD):
    """A[v, t] = T_t on visualization v seen through the evaluation transform (resize, centre crop
    ``input_size``, normalize with ``mean`` and ``std``), no noise. ``resize`` None: in the paper's proportion
    (256 for 224). images: (V, 3, S, S) in [0, 1] -> (V, T)."""
    resize = round(input_size * RESIZE / INPUT_SIZE) if resize is None else resize
    with torch.no_grad():
        view = full_view(images.float(), input_size, resize)
        x = layer_input_with_grad(model, conv, normalize(view, mean, std))
        return target_values(x.float(), conv, weights.to(x), None if bias is None else bias.to(x))


def visualize(model, conv, weights, bias, magnitude, q, size, steps, crops, seed, lr=1.0, batch_size=None,
              device="cpu", input_size=INPUT_SIZE, progress=True, scale=CROP_SCALE, mean=folders.MEAN, std=folders.STD):
    """MACO for every target at once. weights (T, C_in, kh, kw), bias (T,) or None; magnitude (3, S, n), q (3, 3).
    ``input_size``, ``mean``, ``std``: the model's input (the transform's crop and normalization).

    Image t is optimized for target t; at most ``batch_size`` crops (default: all T * crops) go through
    the model at once. Returns dict(images (T, 3, S, S) in [0, 1], transparency (T, 3, S, S) = sum over
    steps of |d loss / d image|, loss (steps,) per-step mean target of each image's own crops (T,)), CPU.
    (Every setting of a run is a parameter, as callers and benchmarks pass them; the loop body is
    ``_crops_backward``.)
    """
    device = torch.device(device)
    t_count = weights.shape[0]
    targets = (weights.to(device, torch.float32), None if bias is None else bias.to(device, torch.float32))
    m = magnitude.to(device, torch.float32)
    qu = unit_color_matrix(q.double()).float().to(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    phase = torch.randn((t_count,) + tuple(m.shape), generator=gen, device=device).requires_grad_(True)
    opt = torch.optim.NAdam([phase], lr=lr)
    transparency = torch.zeros((t_count, 3, size, size), device=device)
    chunk = t_count * crops if not batch_size else max(1, int(batch_size))
    view = (input_size, mean, std)
    history = []
    for _ in tqdm(range(steps), desc="feature visualization", unit="step", disable=not progress, dynamic_ncols=True):
        opt.zero_grad()
        img = maco_image(m, phase, qu)
        leaf = img.detach().requires_grad_(True)
        boxes = crop_boxes(t_count, crops, size, gen, scale)
        own_sum = _crops_backward(model, conv, targets, leaf, boxes, chunk, view, gen)
        transparency += leaf.grad.abs()
        img.backward(leaf.grad)
        opt.step()
        history.append((own_sum / crops).tolist())
    with torch.no_grad():
        final = maco_image(m, phase, qu)
    return {"images": final.detach().cpu(), "transparency": transparency.cpu(), "history": history}


def _crops_backward(model, conv, targets, leaf, boxes, chunk, view, gen):
    """One step's forward and backward of every crop (``boxes``: the same number for each image), ``chunk``
    crops at a time: d loss / d leaf accumulates in ``leaf.grad``. targets: (weights, bias); view: (input size,
    mean, std). Returns each image's sum of its own target over its crops, (T,) float64 on the CPU."""
    input_size, mean, std = view
    crops = len(boxes) // leaf.shape[0]
    own_sum = torch.zeros(leaf.shape[0], dtype=torch.float64)
    for lo in range(0, len(boxes), chunk):
        bx = boxes[lo:lo + chunk]
        x = layer_input_with_grad(model, conv, normalize(add_noise(crops_of(leaf, bx, input_size), gen), mean, std))
        own = target_values(x.float(), conv, *targets).gather(1, bx[:, :1].long()).flatten()
        (-own.sum() / crops).backward()
        own_sum.index_add_(0, bx[:, 0].long().cpu(), own.detach().double().cpu())
    return own_sum


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
