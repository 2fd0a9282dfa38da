r"""Feature visualization (MACO) of a channel and of its disentangled maps: what each one looks for.

MACO (Fel et al., NeurIPS 2023) optimizes only the phase of the image's Fourier spectrum; its magnitude
stays that of natural images (docs/method.md, 'Feature visualization'):
    img = sigmoid(Q~ . standardize(irfft2(M . exp(i phi^))) ),     phi^ = standardize(phi)
then the model's own input normalization. M (3, S, S//2+1) is the mean |rfft2| of the user's training
images after colour decorrelation with Q^-1; Q (3, 3) = U diag(sqrt(s)) from the SVD of their pixel
colour covariance, so Q Q^T = Cov; Q~ = Q scaled so that its largest column has unit norm (the sigmoid
then sees unit-scale values, as in Lucid/Xplique). The phase of the columns that the half spectrum holds
twice is made odd, so that |rfft2| of the standardized image is exactly M / sigma whatever the phase,
at every frequency but the (at most four) self-conjugate ones, whose real value M cos(phi) sets the
mean colour.

Targets, all from the layer's input x (one forward pass up to L, nothing above it runs):
    T_orig(img) = mean_{h,w} max(conv(x, W[c]) + b[c], 0)      (L's output channel c)
    T_j(img)    = mean_{h,w} max(conv(x, D_j)  + b[c], 0)      (j = 1..k; the residue R is not shown)
Each step draws random crops of every image (centres near the middle, sides a fraction of S), resizes
them to the model's input size, adds a little Gaussian and uniform noise; loss = - sum_t mean over the
crops of image t of T_t; NAdam on phi. Image t serves target t and all crops share the model's batches,
so the targets of a run are optimized together. The transparency map is sum over steps of |d loss / d img|;
it is shown as the image faded to white by it (mean over colours, clipped at its 80th percentile, / max).
"""
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm import tqdm

from utils.data import folders
from utils.model.tap import layer_input_with_grad
from utils.files import atomic
from utils.run.cli import UserError, at_least, default_workers
from utils.method.split import filter_maps
from utils.method.evaluation import top_k

INPUT_SIZE = 224           # the evaluation transform's crop: what the model is fed
RESIZE = 256               # ... after resizing the shorter side to this
CROP_SCALE = (0.6, 1.0)    # crop sides, as fractions of S (uniform); the evaluation view is 0.875 S
CENTER_STD = 0.15          # crop centres: 0.5 + N(0, CENTER_STD^2), as fractions of S, kept inside
NOISE = 0.05               # std of the Gaussian and width of the uniform noise, in normalized input units
TOP_IMAGES = 12            # val crops around each visualization (the ring of a 4 x 4 grid)
EPS = 1e-4


# ----------------------------------------------------------------------------- colour and spectrum
def color_moments(images):
    """Pixel sums for the colour covariance. images: (N, 3, H, W) in [0, 1] ->
    (sum (3,), sum of outer products (3, 3), pixel count), float64."""
    p = images.permute(1, 0, 2, 3).reshape(3, -1).double()
    return p.sum(dim=1), p @ p.T, p.shape[1]


def color_covariance(total, outer, count):
    """Cov = E[p p^T] - E[p] E[p]^T from ``color_moments`` summed over batches -> (mean (3,), Cov (3, 3))."""
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


def color_matrix(cov):
    """Q = U diag(sqrt(s)) from the SVD of the colour covariance: Q Q^T = Cov. (3, 3) -> (3, 3) float64."""
    u, s, _ = torch.linalg.svd(cov.double())
    return u * s.clamp_min(0).sqrt()


def unit_color_matrix(q):
    """Q scaled so that its largest column has unit norm (what the parametrization applies). (3, 3)."""
    return q / q.norm(dim=0).max().clamp_min(1e-12)


def decorrelate(images, q, mean):
    """Q^-1 (p - mean) for every pixel p (pseudo-inverse: a colourless data set has a singular Q).

    images: (N, 3, H, W); q: (3, 3); mean: (3,) -> (N, 3, H, W) float64."""
    qi = torch.linalg.pinv(q.double(), rtol=1e-6)
    return torch.einsum("ij,njhw->nihw", qi, images.double() - mean.double().view(1, 3, 1, 1))


def magnitudes(images, q, mean):
    """|rfft2| of the decorrelated images: (N, 3, S, S) -> (N, 3, S, S//2 + 1) float64."""
    return torch.fft.rfft2(decorrelate(images, q, mean)).abs()


def spectrum_from_images(batches):
    """Colour matrix and magnitude spectrum of a set of images, from two passes.

    ``batches``: a callable returning an iterator of (N, 3, S, S) tensors in [0, 1].
    Returns dict(magnitude (3, S, S//2+1) = mean |rfft2(Q^-1 (img - mean))|, q (3, 3), mean (3,),
    cov (3, 3), images), float32 tensors.
    """
    total, outer, count, n = 0, 0, 0, 0
    for b in batches():
        t, o, c = color_moments(b)
        total, outer, count, n = total + t, outer + o, count + c, n + len(b)
    if n == 0:
        raise UserError("no readable training image for the feature-visualization spectrum")
    mean, cov = color_covariance(total, outer, count)
    q = color_matrix(cov)
    acc = 0
    for b in batches():
        acc = acc + magnitudes(b, q, mean).sum(dim=0)
    return {"magnitude": (acc / n).float(), "q": q.float(), "mean": mean.float(), "cov": cov.float(), "images": n}


# ----------------------------------------------------------------------------- parametrization
def standardize(t):
    """(t - mean) / (std + 1e-4) per item, over all but the first dimension. (B, ...) -> (B, ...)."""
    dims = tuple(range(1, t.dim()))
    t = t - t.mean(dim=dims, keepdim=True)
    return t / (t.std(dim=dims, keepdim=True) + EPS)


def self_conjugate(size, device=None):
    """Bool (S, S//2+1): the bins of a real image's half spectrum that equal their own conjugate (DC and,
    for even S, the Nyquist rows/columns' crossings): their value is real, M cos(phi)."""
    mask = torch.zeros(size, size // 2 + 1, dtype=torch.bool, device=device)
    rows = [0] + ([size // 2] if size % 2 == 0 else [])
    for r in rows:
        for c in rows:
            mask[r, c] = True
    return mask


def odd_phase(phase, size):
    """Make the phase odd, phi[-k] = -phi[k], along the rows of the columns that a real image's half
    spectrum holds twice (column 0 and, for even S, column S/2), except at the self-conjugate bins.
    Then M exp(i phi) is, off those bins, the half spectrum of a real image: irfft2 keeps its magnitude.
    phase: (..., S, S//2+1) -> same shape."""
    cols = [0] + ([size // 2] if size % 2 == 0 else [])
    flip = (-torch.arange(size, device=phase.device)) % size
    fixed = flip == torch.arange(size, device=phase.device)
    out = phase.clone()
    for j in cols:
        col = phase[..., :, j]
        out[..., :, j] = torch.where(fixed, col, 0.5 * (col - col[..., flip]))
    return out


def spatial_image(magnitude, phase):
    """The image before the colour matrix: standardize(irfft2(M exp(i phi^))), phi^ odd where it must be.

    At every bin but the self-conjugate ones |rfft2| of the result is M / sigma (sigma: the std that the
    standardization divides by); at those (DC included) the value is the real M cos(phi^), so the phase
    picks the mean colour; the standardization then subtracts one mean over all colours and pixels.
    magnitude: (3, S, S//2+1); phase: (T, 3, S, S//2+1) -> (T, 3, S, S), zero mean and unit std per image.
    """
    size = magnitude.shape[-2]
    phi = odd_phase(standardize(phase), size)
    real_only = (~self_conjugate(size, phase.device)).to(magnitude.dtype)
    spectrum = torch.complex(magnitude * torch.cos(phi), magnitude * torch.sin(phi) * real_only)
    return standardize(torch.fft.irfft2(spectrum, s=(size, size)))


def maco_image(magnitude, phase, q_unit):
    """sigmoid(Q~ . spatial_image): (T, 3, S, S) in (0, 1). q_unit: (3, 3) = unit_color_matrix(Q)."""
    x = spatial_image(magnitude, phase)
    return torch.sigmoid(torch.einsum("ij,tjhw->tihw", q_unit.to(x), x))


def normalize(images, mean=folders.MEAN, std=folders.STD):
    """The model's input normalization of [0, 1] images: (B, 3, H, W) -> (B, 3, H, W)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


# ----------------------------------------------------------------------------- crops
def crop_boxes(n_images, crops, size, gen, scale=CROP_SCALE, center_std=CENTER_STD):
    """Random square crops, ``crops`` per image: (n_images * crops, 5) rows [image, x0, y0, x1, y1] in
    pixels (roi_align's boxes), image-major. Sides uniform in scale * S, centres 0.5 S + N(0, (std S)^2)
    moved so that the box lies inside the image. ``gen``: a torch.Generator (its device is used)."""
    dev = gen.device
    n = n_images * crops
    side = (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=gen, device=dev)) * size
    centre = size * (0.5 + center_std * torch.randn(n, 2, generator=gen, device=dev))
    centre = torch.maximum(torch.minimum(centre, (size - side / 2)[:, None]), (side / 2)[:, None])
    idx = torch.arange(n_images, device=dev).repeat_interleave(crops).to(side.dtype)
    half = (side / 2)[:, None]
    return torch.cat([idx[:, None], centre - half, centre + half], dim=1)


def crops_of(images, boxes, out_size=INPUT_SIZE):
    """Bilinear crops resized to out_size (roi_align, averaging 2 x 2 samples per output pixel).
    images: (T, 3, S, S); boxes: (N, 5) -> (N, 3, out_size, out_size)."""
    return roi_align(images, boxes.to(images), (out_size, out_size), 1.0, 2, True)


def add_noise(images, gen, noise=NOISE):
    """images + N(0, noise^2) + U(-noise/2, noise/2), drawn from ``gen``. Same shape."""
    g = torch.randn(images.shape, generator=gen, device=gen.device, dtype=images.dtype)
    u = torch.rand(images.shape, generator=gen, device=gen.device, dtype=images.dtype)
    return images + noise * g + noise * (u - 0.5)


def full_view(images, input_size=INPUT_SIZE, resize=RESIZE):
    """The evaluation transform on square [0, 1] images: resize to ``resize`` (antialiased bilinear),
    centre crop ``input_size``. (T, 3, S, S) -> (T, 3, input_size, input_size)."""
    r = F.interpolate(images, size=(resize, resize), mode="bilinear", align_corners=False,
                      antialias=resize < images.shape[-1])
    o = (resize - input_size) // 2
    return r[..., o:o + input_size, o:o + input_size]


# ----------------------------------------------------------------------------- targets
def target_filters(conv, channel, state_dict):
    """The filters whose maps are visualized: [W[c], D_1, ..., D_k] from a checkpoint [D_1, ..., D_k, R].

    Returns (weights (T, C_in, kh, kw), bias (T,) or None, names ['original', 'D1', ..., 'Dk']), T = k + 1.
    Raises UserError when the checkpoint does not fit the layer.
    """
    w_c = conv.weight[channel].detach().cpu()
    d = state_dict.get("disentangled.weight")
    if d is None or d.dim() != 4 or d.shape[0] < 3 or tuple(d.shape[1:]) != tuple(w_c.shape):
        raise UserError(f"the checkpoint's disentangled.weight has shape {None if d is None else tuple(d.shape)}; "
                        f"expected (k+1, {', '.join(map(str, w_c.shape))}) for this layer")
    k = d.shape[0] - 1
    weights = torch.cat([w_c[None], d[:k].to(w_c)])
    bias = None
    if conv.bias is not None:
        b = state_dict.get("disentangled.bias")
        b_c = conv.bias[channel].detach().cpu().reshape(1)
        bias = torch.cat([b_c, (b[:k] if b is not None else b_c.repeat(k)).to(b_c)])
    return weights, bias, ["original"] + [f"D{j + 1}" for j in range(k)]


def target_maps(x, conv, weights, bias):
    """max(conv(x, weights) + bias, 0) with the layer's geometry: (N, C_in, H, W) -> (N, T, H', W')."""
    return filter_maps(x, conv, weights, bias).clamp_min(0)


def target_values(x, conv, weights, bias):
    """T_t = mean_{h,w} max(conv(x, weights[t]) + bias[t], 0): (N, C_in, H, W) -> (N, T)."""
    return target_maps(x, conv, weights, bias).mean(dim=(2, 3))


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


# ----------------------------------------------------------------------------- optimization
def visualize(model, conv, weights, bias, magnitude, q, size, steps, crops, seed, lr=1.0, batch_size=None,
              device="cpu", input_size=INPUT_SIZE, progress=True, scale=CROP_SCALE, mean=folders.MEAN, std=folders.STD):
    """MACO for every target at once. weights (T, C_in, kh, kw), bias (T,) or None; magnitude (3, S, n), q (3, 3).
    ``input_size``, ``mean``, ``std``: the model's input (the transform's crop and normalization).

    Image t is optimized for target t; at most ``batch_size`` crops (default: all T * crops) go through
    the model at once. Returns dict(images (T, 3, S, S) in [0, 1], transparency (T, 3, S, S) = sum over
    steps of |d loss / d image|, loss (steps,) per-step mean target of each image's own crops (T,)), CPU.
    """
    device = torch.device(device)
    t_count = weights.shape[0]
    w = weights.to(device, torch.float32)
    b = None if bias is None else bias.to(device, torch.float32)
    m = magnitude.to(device, torch.float32)
    qu = unit_color_matrix(q.double()).float().to(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    phase = torch.randn((t_count,) + tuple(m.shape), generator=gen, device=device).requires_grad_(True)
    opt = torch.optim.NAdam([phase], lr=lr)
    transparency = torch.zeros((t_count, 3, size, size), device=device)
    total = t_count * crops
    chunk = total if not batch_size else max(1, int(batch_size))
    history = []
    for _ in tqdm(range(steps), desc="feature visualization", unit="step", disable=not progress, dynamic_ncols=True):
        opt.zero_grad()
        img = maco_image(m, phase, qu)
        leaf = img.detach().requires_grad_(True)
        boxes = crop_boxes(t_count, crops, size, gen, scale)
        own_sum = torch.zeros(t_count, dtype=torch.float64)
        for lo in range(0, total, chunk):
            bx = boxes[lo:lo + chunk]
            x = layer_input_with_grad(model, conv,
                                      normalize(add_noise(crops_of(leaf, bx, input_size), gen), mean, std))
            own = target_values(x.float(), conv, w, b).gather(1, bx[:, :1].long()).flatten()
            (-own.sum() / crops).backward()
            own_sum.index_add_(0, bx[:, 0].long().cpu(), own.detach().double().cpu())
        transparency += leaf.grad.abs()
        img.backward(leaf.grad)
        opt.step()
        history.append((own_sum / crops).tolist())
    with torch.no_grad():
        final = maco_image(m, phase, qu)
    return {"images": final.detach().cpu(), "transparency": transparency.cpu(), "history": history}


def faded(image, transparency, percentile=80):
    """The visualization faded to white by its transparency: alpha = mean over colours, clipped at its
    ``percentile``-th percentile, / max; out = alpha * image + (1 - alpha).
    image, transparency: (3, S, S) arrays -> (S, S, 3) float array in [0, 1]."""
    img = np.asarray(image, dtype=np.float64).transpose(1, 2, 0)
    alpha = np.asarray(transparency, dtype=np.float64).mean(axis=0)
    alpha = np.minimum(alpha, np.percentile(alpha, percentile))
    alpha = alpha / max(alpha.max(), 1e-12)
    return alpha[..., None] * img + (1 - alpha[..., None])


# ----------------------------------------------------------------------------- val images
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


def scan_val(model, conv, weights, bias, ds, indices, batch_size, device, num_workers, unreadable="error", hint=""):
    """Targets on val images from a forward pass up to the layer: returns (kept indices (N,), values (N, T)
    = T_t per image, argmax positions (N, T, 2) of each target's map, map size (H', W'))."""
    w = weights.to(device, torch.float32)
    b = None if bias is None else bias.to(device, torch.float32)
    vals, poss = [], []
    size = None
    loader = folders.make_loader(ds, folders.batches_of(indices, batch_size), num_workers, device, unreadable, hint)
    with torch.no_grad():
        for images, _ in tqdm(loader, desc="val images", unit="batch", dynamic_ncols=True):
            x = layer_input_with_grad(model, conv, images.to(device, non_blocking=True)).float()
            maps = target_maps(x, conv, w, b)
            size = tuple(maps.shape[-2:])
            vals.append(maps.mean(dim=(2, 3)).cpu())
            flat = maps.flatten(2).argmax(dim=2).cpu()
            poss.append(torch.stack([flat // size[1], flat % size[1]], dim=2))
    if not vals:
        raise UserError(f"none of the {len(indices)} val images could be read")
    skipped = set(loader.skipped)
    kept = np.asarray([i for i in indices if i not in skipped])
    return kept, torch.cat(vals).numpy(), torch.cat(poss).numpy(), size


# ----------------------------------------------------------------------------- the spectrum, stored
def files_sha256(paths):
    """sha256 over the bytes of the files ``paths``, in order (what the images hold, not only their names)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def spectrum_key(summary, size, n_images, content_sha256):
    """What a spectrum was made from (the training split's class folders, image counts and file list, the
    bytes of the images used, the size, the number of images): a dict, and the 16 hex digits of its sha256
    that name the file."""
    meta = {"classes": summary["classes"], "images_per_class": summary["images_per_class"],
            "files_sha256": summary["files_sha256"], "content_sha256": content_sha256,
            "size": int(size), "images": int(n_images),
            "transform": f"Resize({size}) CenterCrop({size}) ToTensor", "version": 1}
    return meta, hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def spectrum_images(ds, n):
    """Dataset indices of ``n`` training images spread evenly over the ImageFolder order (all classes)."""
    return sorted(set(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int).tolist()))


def load_or_make_spectrum(folder, data_dir, size, n_images, batch_size, num_workers):
    """The colour matrix and spectrum of the training images at size S, computed once and kept in
    ``folder`` as ``spectrum_S{S}_{key}.npz`` with what made it (a different data set, even one with the same
    file names, another size or number of images gets its own file; a file whose record differs is never used). Returns (dict, path, reused)."""
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    ds = folders.image_folder(data_dir, "train", transform=tf)
    idx = spectrum_images(ds, n_images)
    meta, key = spectrum_key(folders.dataset_summary(ds), size, n_images, files_sha256(ds.samples[i][0] for i in idx))
    path = os.path.join(folder, f"spectrum_S{size}_{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            if json.loads(str(z["meta"])) == meta:
                return {k: torch.from_numpy(z[k]) for k in ("magnitude", "q", "mean", "cov")}, path, True
    batches = folders.batches_of(idx, max(1, batch_size))

    def iterate():
        loader = folders.make_loader(ds, batches, num_workers, "cpu", unreadable="skip")
        return (im for im, _ in tqdm(loader, desc=f"spectrum of {len(idx)} training images", unit="batch",
                                     dynamic_ncols=True))
    spec = spectrum_from_images(iterate)
    atomic.save_npz(path, {"magnitude": spec["magnitude"].numpy(), "q": spec["q"].numpy(),
                           "mean": spec["mean"].numpy(), "cov": spec["cov"].numpy(),
                           "meta": np.asarray(json.dumps(meta))})
    return spec, path, False


# ----------------------------------------------------------------------------- stage 4's --get_feature_vis
DEFAULTS = {"fv_size": 512, "fv_steps": 256, "fv_crops": 32, "fv_seed": 0, "fv_lr": 1.0, "fv_spectrum_images": 256}
CONCEPT_COLOURS = {1: (31, 119, 180), 2: (255, 127, 14), 3: (44, 160, 44), 4: (214, 39, 40), 5: (148, 103, 189),
                   6: (140, 86, 75)}   # frames of the val crops of concepts 1..6 (matplotlib's C0 .. C5)
TITLES = {"original": "Original"}


def add_args(parser):
    """Stage 4's feature-visualization flags (bad values raise UserError: one line, exit status 2)."""
    g = parser.add_argument_group("feature visualization (--get_feature_vis)")
    g.add_argument("--get_feature_vis", action="store_true",
                   help="MACO feature visualizations of the original channel and of each disentangled map, "
                        "with their top val images: plots/feature_vis_{run}.png and results_disentanglement/"
                        "{run}_feature_vis.json")
    g.add_argument("--fv_size", type=at_least("--fv_size", 1, int), default=DEFAULTS["fv_size"],
                   help="side S of the optimized image in pixels (default 512)")
    g.add_argument("--fv_steps", type=at_least("--fv_steps", 1, int), default=DEFAULTS["fv_steps"],
                   help="optimization steps (default 256)")
    g.add_argument("--fv_crops", type=at_least("--fv_crops", 1, int), default=DEFAULTS["fv_crops"],
                   help="random crops of each image per step (default 32)")
    g.add_argument("--fv_seed", type=at_least("--fv_seed", 0, int), default=DEFAULTS["fv_seed"],
                   help="seed of the phases, crops and noise (default 0): same seed, same images")
    g.add_argument("--fv_lr", type=at_least("--fv_lr", 1e-12, float, "positive"), default=DEFAULTS["fv_lr"],
                   help="NAdam learning rate on the phase (default 1.0)")
    g.add_argument("--fv_spectrum_images", type=at_least("--fv_spectrum_images", 1, int),
                   default=DEFAULTS["fv_spectrum_images"],
                   help="training images that estimate the magnitude spectrum and colour matrix (default 256; "
                        "computed once per data set and size, kept in MODEL_DIR/feature_vis_spectra/)")
    return parser


def title_of(name):
    """'original' -> 'Original', 'D2' -> 'Disentangled 2'."""
    return TITLES.get(name, f"Disentangled {name[1:]}")


def _val_crop(path, box, cell, transform=folders.DEFAULT_TRANSFORM):
    from PIL import Image
    from torchvision import transforms
    with Image.open(path) as im:
        im = transforms.CenterCrop(transform.crop)(transforms.Resize(transform.resize)(im.convert("RGB")))
        return np.asarray(im.crop(box).resize((cell, cell)), dtype=np.float64) / 255


def run_for_checkpoint(ctx, args, state_dict, channel, concepts, run_name, out_dir, val_images=None):
    """Stage 4's --get_feature_vis: visualize the original channel and every disentangled map of the
    checkpoint (T = k + 1 targets: original, D1 .. Dk), rank the concepts' val images by each target, and write
    the figure, the raw images, the transparency maps and ``results_disentanglement/{run}_feature_vis.json``.

    concepts: the k class lists of the concepts (val images of concept j: those of its classes); val_images:
    instead, (dataset indices, concept ids 1..k) of the val images to rank (concepts given as clusters).
    Returns the record."""
    from utils.report import plots
    start = time.time()
    device, model, conv = ctx.device, ctx.model.to(ctx.device), ctx.conv
    weights, bias, names = target_filters(conv, channel, state_dict)
    workers = default_workers(args.num_workers)
    spec, spec_path, reused = load_or_make_spectrum(os.path.join(args.model_dir, "feature_vis_spectra"),
                                                    args.data_dir, args.fv_size, args.fv_spectrum_images,
                                                    args.batch_size, workers)
    print(f"feature visualization: {'reusing' if reused else 'computed'} the spectrum {spec_path}")
    t0 = time.time()
    tf = ctx.transform  # what the model is fed: its crop size and normalization
    vis = visualize(model, conv, weights, bias, spec["magnitude"], spec["q"], args.fv_size, args.fv_steps,
                    args.fv_crops, args.fv_seed, args.fv_lr, args.batch_size, device, input_size=tf.crop,
                    mean=tf.mean, std=tf.std)
    opt_seconds = time.time() - t0
    act = activation_matrix(model, conv, weights, bias, vis["images"].to(device), tf.crop, tf.resize, tf.mean,
                            tf.std).cpu()

    ds = ctx.dataset
    unreadable = "skip" if getattr(args, "skip_unreadable", False) else "error"
    if val_images is None:
        wanted = folders.indices_of_classes(ds, [y for c in concepts for y in c])
    else:
        of_index = {int(i): int(j) for i, j in zip(*val_images)}
        wanted = sorted(of_index)
    kept, vals, poss, map_size = scan_val(model, conv, weights, bias, ds, wanted, args.batch_size, device, workers,
                                          unreadable)
    rf, _ = receptive_field(model, conv, tf.crop, device)
    if val_images is None:
        labels = np.asarray([ds.targets[i] for i in kept])
        concept = np.zeros(len(kept), dtype=np.int64)
        for j in range(len(concepts), 0, -1):
            concept[np.isin(labels, concepts[j - 1])] = j
    else:
        concept = np.asarray([of_index[int(i)] for i in kept], dtype=np.int64)
    cell = 96
    panels, top, images, transp = [], {}, vis["images"].numpy(), vis["transparency"].numpy()
    for t, name in enumerate(names):
        pick = top_k(vals[:, t], TOP_IMAGES)
        crops = []
        top[name] = []
        for i in pick:
            box = rf_box(tuple(poss[i, t]), map_size, rf, tf.crop)
            crops.append((_val_crop(ds.samples[kept[i]][0], box, cell, tf), CONCEPT_COLOURS[int(concept[i])]))
            top[name].append({"image": folders.relative_name(ds, int(kept[i])), "concept": int(concept[i]),
                              "value": float(vals[i, t]), "box": list(box)})
        panels.append((title_of(name), faded(images[t], transp[t]), crops))
    plot_dir, res_dir = os.path.join(out_dir, "plots"), os.path.join(out_dir, "results_disentanglement")
    title = f"{ctx.tag} {ctx.layer_path} channel {channel}"
    fig = os.path.join(plot_dir, f"feature_vis_{run_name}.png")
    plots.feature_vis_figure(fig, panels, title, cell=cell)
    plots.image_row(os.path.join(plot_dir, f"feature_vis_{run_name}_raw.png"),
                    [im.transpose(1, 2, 0) for im in images], [title_of(n) for n in names], title)
    atomic.save_npy(os.path.join(res_dir, f"{run_name}_feature_vis_images.npy"), images.astype(np.float32))
    atomic.save_npy(os.path.join(res_dir, f"{run_name}_feature_vis_transparency.npy"), transp.astype(np.float32))
    latest = "" if ctx.name in (None, ctx.tag) else f"_{ctx.name}"  # a layer other than the last conv: its own
    with atomic.atomic_path(os.path.join(plot_dir, f"feature_vis{latest}.png")) as tmp:
        with open(fig, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
    record = {"model": ctx.model_spec, "layer": ctx.layer_path, "channel": channel,
              **({f"classes{j}": c for j, c in enumerate(concepts, start=1)} if val_images is None else
                 {f"val_images_concept{j}": int((concept == j).sum()) for j in range(1, len(names))}),
              "targets": names, "titles": [title_of(n) for n in names],
              "activation": act.tolist(), "val_max": [float(v) for v in vals.max(axis=0)],
              "val_images": int(len(kept)), "size": args.fv_size, "steps": args.fv_steps, "crops": args.fv_crops,
              "seed": args.fv_seed, "lr": args.fv_lr, "batch_size": args.batch_size, "device": str(device),
              "crop_scale": list(CROP_SCALE), "noise": NOISE, "spectrum": spec_path, "spectrum_reused": reused,
              "receptive_field": list(rf), "seconds": round(time.time() - start, 2),
              "seconds_optimization": round(opt_seconds, 2), "seconds_per_step": round(opt_seconds / args.fv_steps, 4),
              "final_crop_mean": vis["history"][-1], "top_images": top,
              "images": f"{run_name}_feature_vis_images.npy",
              "transparency": f"{run_name}_feature_vis_transparency.npy", "figure": fig}
    atomic.write_json(os.path.join(res_dir, f"{run_name}_feature_vis.json"), record)
    head = "visualization \\ target " + " ".join(f"{n:>10}" for n in names)
    print(head)
    for t, n in enumerate(names):
        print(f"{title_of(n):>22} " + " ".join(f"{v:10.4g}" for v in act[t].tolist()))
    print(f"{'val max':>22} " + " ".join(f"{v:10.4g}" for v in record["val_max"]))
    print(f"{args.fv_steps} steps of {len(names)} x {args.fv_crops} crops at S={args.fv_size}: "
          f"{opt_seconds:.1f} s; wrote {fig} and {res_dir}/{run_name}_feature_vis.json")
    return record
