r"""What the model sees of a visualization: random crops with noise while optimizing, the evaluation view after.

Each step draws random square crops of every image (centres 0.5 S + N(0, (CENTER_STD S)^2), kept inside the
image; sides uniform in CROP_SCALE * S), resizes them to the model's input size (bilinear, roi_align) and adds
Gaussian N(0, NOISE^2) and uniform U(-NOISE/2, NOISE/2) noise in the model's normalized input units. The
evaluation view is the evaluation transform on the square image: resize, centre crop. Pure functions on tensors.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

CROP_SCALE = (0.6, 1.0)    # crop sides, as fractions of S (uniform); the evaluation view is 0.875 S
CENTER_STD = 0.15          # crop centres: 0.5 + N(0, CENTER_STD^2), as fractions of S, kept inside
NOISE = 0.05               # std of the Gaussian and width of the uniform noise, in normalized input units


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


def crops_of(images, boxes, out_size):
    """Bilinear crops resized to out_size (roi_align, averaging 2 x 2 samples per output pixel).
    images: (T, 3, S, S); boxes: (N, 5) -> (N, 3, out_size, out_size)."""
    return roi_align(images, boxes.to(images), (out_size, out_size), 1.0, 2, True)


def add_noise(images, gen, noise=NOISE):
    """images + N(0, noise^2) + U(-noise/2, noise/2), drawn from ``gen``. Same shape."""
    return with_noise(images, *noise_draws(images.shape, images.dtype, gen), noise)


def noise_draws(shape, dtype, gen):
    """The standard normal and the uniform [0, 1) draws of ``add_noise`` for images of ``shape``, in this
    order from ``gen``: (g, u), each of ``shape``."""
    g = torch.randn(shape, generator=gen, device=gen.device, dtype=dtype)
    u = torch.rand(shape, generator=gen, device=gen.device, dtype=dtype)
    return g, u


def with_noise(images, g, u, noise=NOISE):
    """images + noise * g + noise * (u - 0.5): elementwise, so any slice of the draws gives the same numbers
    as the whole. images, g, u: the same shape."""
    return images + noise * g + noise * (u - 0.5)


def full_view(images, input_size, resize):
    """The evaluation transform on square [0, 1] images: resize to ``resize`` (antialiased bilinear),
    centre crop ``input_size``. (T, 3, S, S) -> (T, 3, input_size, input_size)."""
    r = F.interpolate(images, size=(resize, resize), mode="bilinear", align_corners=False,
                      antialias=resize < images.shape[-1])
    o = (resize - input_size) // 2
    return r[..., o:o + input_size, o:o + input_size]


def normalize(images, mean, std):
    """The model's input normalization of [0, 1] images: (B, 3, H, W) -> (B, 3, H, W)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s
