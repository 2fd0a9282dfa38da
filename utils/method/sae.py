r"""The sparse-autoencoder view of a channel (docs/method.md, 'The sparse-autoencoder view'): a TopK SAE on the layer's input vectors,
and the channel's map decomposed exactly over its features.

The SAE sees L's input one position at a time, x = x[:, h, w] (C_in values):
    f     = TopK(ReLU(W_enc (x - b_dec) + b_enc))       (m = expansion * C_in features, k of them non-zero)
    x_hat = W_dec f + b_dec = sum_j f_j d_j + b_dec      (d_j: unit-norm decoder columns, renormalised
                                                          after every step)
trained with Adam on the normalised MSE sum ||x - x_hat||^2 / sum ||x||^2 over a batch. The training
vectors are a few positions per training image, drawn without replacement with probability
proportional to ||x[:, h, w]|| (where the layer's input is strong).

Because L is linear, channel c's map on the reconstruction splits over the features, tap by tap:
    conv(x_hat, W[c]) + b[c] = sum_j conv(f_j, K_j) + conv(B, W[c]) + b[c],   K_j[i, l] = W[c, :, i, l] . d_j
where f_j is feature j's (H, W) map and B = b_dec at every position (a (C_in, H, W) map). With zero
padding conv(B, W[c]) is not one number: near the border some taps fall on the padding, so it is
computed as a map (the "constant term"). contribution_j = conv(f_j, K_j) is feature j's share of the
channel's map, exact up to the SAE's reconstruction error a[c] - conv(x_hat, W[c]) - b[c].

Written here in torch (about 60 lines for the SAE itself): no maintained SAE library installs with the
pinned torch without pulling in a training framework.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class TopKSAE(nn.Module):
    """W_enc (m, n), b_enc (m,), W_dec (n, m) with unit-norm columns, b_dec (n,); k features active."""

    def __init__(self, n, m, k, generator=None):
        super().__init__()
        if not 1 <= k <= m:
            raise ValueError(f"k = {k} must be between 1 and the dictionary size m = {m}")
        self.k = int(k)
        d = torch.randn(n, m, generator=generator)
        d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(d)
        self.W_enc = nn.Parameter(d.T.clone())  # tied at the start (Gao et al. 2024)
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(n))

    def pre_activations(self, x):
        """ReLU(W_enc (x - b_dec) + b_enc): (B, n) -> (B, m)."""
        return F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def encode(self, x):
        """f = TopK(pre-activations): (B, n) -> (B, m), the k largest kept (ties: lower index), the rest 0."""
        pre = self.pre_activations(x)
        val, idx = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, val)

    def decode(self, f):
        """x_hat = W_dec f + b_dec: (B, m) -> (B, n)."""
        return f @ self.W_dec.T + self.b_dec

    def forward(self, x):
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))


def normalized_mse(x, x_hat):
    """sum ||x - x_hat||^2 / sum ||x||^2 over the batch: (B, n), (B, n) -> scalar."""
    return (x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)


def train_sae(vectors, m, k, steps, batch_size=1024, lr=1e-3, seed=0, on_step=None):
    """Train a TopKSAE on ``vectors`` (N, n) (float32, any device): Adam on ``normalized_mse``, random
    batches (with replacement) from a seeded generator, decoder columns renormalised after every step.
    b_dec starts at the geometric median of (up to 8192 of) the vectors. ``on_step(sae)`` is called after each
    step (a progress bar, a test's check). Returns (sae, losses (steps,) list)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = vectors.shape[1]
    sae = TopKSAE(n, m, k, gen).to(vectors.device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(vectors[torch.randint(len(vectors), (min(len(vectors), 8192),), generator=gen)]))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(vectors), (min(batch_size, len(vectors)),), generator=gen).to(vectors.device)
        x = vectors[idx]
        loss = normalized_mse(x, sae(x)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(sae)
    return sae.eval(), losses


def geometric_median(x, iterations=30):
    """Weiszfeld's iterations from the mean: the point minimising sum_i ||x_i - z||. (N, n) -> (n,)."""
    z = x.mean(dim=0)
    for _ in range(iterations):
        w = 1 / (x - z).norm(dim=1).clamp_min(1e-8)
        z = (w[:, None] * x).sum(dim=0) / w.sum()
    return z


def sample_positions(x, per_image, generator):
    """``per_image`` positions of every image, without replacement, with probability proportional to
    ||x[:, h, w]|| (all positions when per_image >= H W). x: (N, C, H, W) -> (N * p, C) vectors."""
    N, C, H, W = x.shape
    flat = x.flatten(2).transpose(1, 2)  # (N, HW, C)
    p = min(int(per_image), H * W)
    if p == H * W:
        return flat.reshape(-1, C)
    weights = flat.norm(dim=2).double().cpu() + 1e-12  # an all-zero image: uniform
    pick = torch.multinomial(weights, p, replacement=False, generator=generator).to(x.device)
    return torch.gather(flat, 1, pick[..., None].expand(-1, -1, C)).reshape(-1, C)


def feature_maps(sae, x):
    """The SAE's features at every position: x (N, C, H, W) -> f (N, m, H, W)."""
    N, C, H, W = x.shape
    f = sae.encode(x.permute(0, 2, 3, 1).reshape(-1, C))
    return f.reshape(N, H, W, -1).permute(0, 3, 1, 2)


def reconstruction(sae, f):
    """x_hat at every position from feature maps: (N, m, H, W) -> (N, C, H, W)."""
    N, m, H, W = f.shape
    return sae.decode(f.permute(0, 2, 3, 1).reshape(-1, m)).reshape(N, H, W, -1).permute(0, 3, 1, 2)


def tap_kernels(weight_c, W_dec):
    """K_j[i, l] = W[c, :, i, l] . d_j: weight_c (C_in, kh, kw), W_dec (C_in, m) -> (m, 1, kh, kw)."""
    return torch.einsum("kil,km->mil", weight_c.to(W_dec), W_dec)[:, None]


def channel_contributions(f, conv, weight_c, W_dec):
    """contribution_j = conv(f_j, K_j) with the layer's geometry: f (N, m, H, W) -> (N, m, H', W')."""
    k = tap_kernels(weight_c, W_dec).to(f)
    return F.conv2d(f, k, None, conv.stride, conv.padding, conv.dilation, groups=f.shape[1])


def constant_term(conv, weight_c, bias_c, b_dec, size):
    """conv(B, W[c]) + b[c], B = b_dec at every one of the (H, W) = ``size`` input positions; exact at the
    padded border. weight_c (C_in, kh, kw), bias_c scalar tensor or None, b_dec (C_in,) -> (H', W')."""
    B = b_dec.reshape(1, -1, 1, 1).expand(1, -1, *size)
    out = F.conv2d(B, weight_c[None].to(B), None if bias_c is None else bias_c.reshape(1).to(B),
                   conv.stride, conv.padding, conv.dilation)
    return out[0, 0]


def fraction_of_variance_unexplained(x, x_hat):
    """sum ||x - x_hat||^2 / sum ||x - mean x||^2 over vectors: (N, n), (N, n) -> float."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-30))


def dead_features(active_counts):
    """Features that never fired: (m,) counts of activity -> list of indices."""
    return torch.nonzero(torch.as_tensor(active_counts) == 0).flatten().tolist()
