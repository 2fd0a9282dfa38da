"""Finite or refused: a tensor of weights, attributions or activations that holds NaN or infinity stops the stage
with one line (which tensor, how many values) instead of flowing into files as silently wrong numbers."""
import numpy as np
import torch

from utils.errors import UserError


def nonfinite_count(values):
    """How many entries of ``values`` (a torch tensor or numpy array of any shape) are NaN or +-inf; 0 for
    integer types."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            return 0
        return int((~torch.isfinite(values)).sum())
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def refuse_nonfinite(values, what, remedy):
    """UserError ``{what} hold N values that are not finite (NaN or infinity) of M; {remedy}`` if any entry of
    ``values`` is not finite."""
    n = nonfinite_count(values)
    if n:
        size = values.numel() if isinstance(values, torch.Tensor) else np.asarray(values).size
        raise UserError(f"{what} hold {n} values that are not finite (NaN or infinity) of {size}; {remedy}")


def refuse_nonfinite_weights(model, what):
    """Refuse a model whose parameters or buffers hold NaN or infinity, naming the first such tensor."""
    bad = [(name, nonfinite_count(t)) for name, t in model.state_dict().items()]
    bad = [(name, n) for name, n in bad if n]
    if bad:
        total = sum(n for _, n in bad)
        raise UserError(f"the model's weights ({what}) hold {total} values that are not finite (NaN or infinity) in "
                        f"{len(bad)} tensors, first {bad[0][0]} ({bad[0][1]} values): every number computed from them "
                        f"would be meaningless; pass finite weights")
