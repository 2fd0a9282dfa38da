"""What a split checkpoint holds, and how an exported network records its layer: shared by the disentangled network
of one channel (``utils.model.disentangled``) and the whole-layer network (``utils.model.whole_layer``).

A k-way checkpoint of channel c of a layer with weight (C_out, C_in, kh, kw) holds ``disentangled.weight``
(k+1, C_in, kh, kw) = [D_1, ..., D_k, R], ``merged.weight`` (1, k+1, 1, 1) and, exactly when the layer has a
bias, ``disentangled.bias`` (k+1,).
"""
from utils.model.layer_view import as_view


def concepts_of_checkpoint(state_dict):
    """k, the number of concepts of a checkpoint: disentangled.weight has k + 1 filters."""
    return int(state_dict["disentangled.weight"].shape[0]) - 1


def checkpoint_problem(sd, conv):
    """Why the state dict ``sd`` is not a k-way checkpoint (k >= 2, read from it) of a channel of ``conv``, or
    None: disentangled.weight (k+1, C_in, kh, kw), merged.weight (1, k+1, 1, 1), disentangled.bias (k+1,)
    exactly when the layer has a bias."""
    d = sd.get("disentangled.weight") if isinstance(sd, dict) else None
    shape = tuple(as_view(conv).weight.shape[1:])
    if d is None or d.dim() != 4 or d.shape[0] < 3 or tuple(d.shape[1:]) != shape:
        return (f"disentangled.weight has shape {None if d is None else tuple(d.shape)}, expected (k+1, "
                f"{', '.join(map(str, shape))}) with k >= 2 concepts")
    n = d.shape[0]
    m = sd.get("merged.weight")
    if m is None or tuple(m.shape) != (1, n, 1, 1):
        return f"merged.weight has shape {None if m is None else tuple(m.shape)}, expected {(1, n, 1, 1)}"
    b = sd.get("disentangled.bias")
    if (conv.bias is None) != (b is None) or (b is not None and tuple(b.shape) != (n,)):
        return (f"disentangled.bias is {None if b is None else tuple(b.shape)}, expected "
                f"{None if conv.bias is None else (n,)}")
    return None


def conv_geometry(conv):
    """A Conv2d's geometry as an exported network's record writes it (``kernel_size=(1, 1), stride=...``)."""
    return (f"kernel_size={tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={tuple(conv.padding)}, "
            f"dilation={tuple(conv.dilation)}, bias={conv.bias is not None}")


def exported_weights(weights_id):
    """The --weights an exported network's record names (None for a factory's own weights)."""
    return None if weights_id == "factory" else weights_id


def exported_state_dict(dmodel):
    """The disentangled network's state dict as plain, contiguous CPU tensors (nothing shared, no views)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in dmodel.state_dict().items()}
