r"""The MACO image (Fel et al., NeurIPS 2023): a phase optimized under a fixed magnitude spectrum.

Only the phase phi of the image's Fourier spectrum is optimized; its magnitude M stays that of natural images
(docs/method.md, 'Feature visualization'):
    img = sigmoid(Q~ . standardize(irfft2(M . exp(i phi^))) ),     phi^ = standardize(phi)
then the model's own input normalization (``transform.normalize``). M (3, S, S//2+1) is the mean |rfft2| of the
user's training images after colour decorrelation with Q^-1; Q (3, 3) = U diag(sqrt(s)) from the SVD of their
pixel colour covariance, so Q Q^T = Cov; Q~ = Q scaled so that its largest column has unit norm (the sigmoid
then sees unit-scale values, as in Lucid/Xplique). The phase of the columns that the half spectrum holds
twice is made odd, so that |rfft2| of the standardized image is exactly M / sigma whatever the phase,
at every frequency but the (at most four) self-conjugate ones, whose real value M cos(phi) sets the
mean colour. Pure functions on tensors.
"""
import torch

EPS = 1e-4


# ----------------------------------------------------------------------------- colour
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


# ----------------------------------------------------------------------------- spectrum -> image
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
