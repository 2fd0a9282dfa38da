"""Which output of the model each class folder is: the label whose logit the attributions differentiate.

ImageFolder numbers the class folders 0..K-1 in sorted order; the model has M outputs. The output of folder y:
  - M = K and no --class_index_map: y itself (the published behaviour; nothing is recorded);
  - --class_index_map FILE: the file's index for the folder's name (every folder listed, indices < M, distinct);
  - M = 1000 and every folder an ImageNet WordNet id (n01440764, ...): its standard ImageNet index, the
    position of the id in the sorted list of the 1000 ids (utils/imagenet_wnids.txt);
  - otherwise: K > M is refused (labels past the outputs), K < M needs --class_index_map.
Class indices in flags and file names stay folder indices; the stored targets are output indices.
"""
import functools
import json
import os

import torch

from utils.errors import UserError

WNIDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_wnids.txt")


@functools.lru_cache(maxsize=1)
def imagenet_wnids():
    """The 1000 ImageNet-1k WordNet ids in their standard order (sorted): index i is output i of an ImageNet model.
    Read once; callers share the list and do not change it."""
    with open(WNIDS_FILE) as f:
        return f.read().split()


def num_outputs(model, crop):
    """Number of outputs of ``model`` on one blank (1, 3, crop, crop) image (its logits' last dimension)."""
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, crop, crop, device=p.device if p is not None else "cpu")
    with torch.no_grad():
        out = model(x)
    if not torch.is_tensor(out) or out.ndim != 2:
        raise UserError(f"the model's output has shape {tuple(getattr(out, 'shape', ()))}, not (batch, classes)")
    return int(out.shape[1])


def read_index_map(path):
    """{folder name: output index} from a JSON object or 'folder index' lines (# comments)."""
    if not os.path.isfile(path):
        raise UserError(f"--class_index_map {path}: file not found")
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise UserError(f"--class_index_map {path}: not valid JSON ({e})")
        items = list(raw.items())
    else:
        items = []
        for n, line in enumerate(text.splitlines(), start=1):
            parts = line.split("#")[0].split()
            if not parts:
                continue
            if len(parts) != 2:
                raise UserError(f"--class_index_map {path}: line {n} is not 'folder index': {line.strip()!r}")
            items.append(tuple(parts))
    out = {}
    for name, value in items:
        try:
            out[str(name)] = int(value)
        except (TypeError, ValueError):
            raise UserError(f"--class_index_map {path}: index of '{name}' is not an integer: {value!r}")
    return out


def class_outputs(classes, n_outputs, index_map=None):
    """Output index of each class folder (a list, or None when folder y is output y) and how it was found.

    classes: the ImageFolder's class folder names (sorted); n_outputs: the model's number of outputs;
    index_map: the --class_index_map path or None. Raises UserError (one line) for labels past the outputs.
    """
    k = len(classes)
    if index_map is not None:
        table = read_index_map(index_map)
        missing = [c for c in classes if c not in table]
        if missing:
            raise UserError(f"--class_index_map {index_map}: no index for the class folder '{missing[0]}' "
                            f"({len(missing)} of {k} folders missing)")
        out = [table[c] for c in classes]
        bad = [(c, i) for c, i in zip(classes, out) if not 0 <= i < n_outputs]
        if bad:
            raise UserError(f"--class_index_map {index_map}: folder '{bad[0][0]}' maps to output {bad[0][1]}, but "
                            f"the model has {n_outputs} outputs (0..{n_outputs - 1})")
        if len(set(out)) != k:
            raise UserError(f"--class_index_map {index_map}: two class folders map to the same output")
        return (None if out == list(range(k)) else out), "--class_index_map"
    if n_outputs == 1000 and k <= 1000:
        wnids = imagenet_wnids()
        where = {w: i for i, w in enumerate(wnids)}
        if all(c in where for c in classes):
            out = [where[c] for c in classes]
            return (None if out == list(range(k)) else out), "ImageNet WordNet ids"
    if k > n_outputs:
        raise UserError(f"the data has {k} class folders but the model has {n_outputs} outputs: labels "
                        f"{n_outputs}..{k - 1} have no logit; pass a model with {k} outputs (or a "
                        f"--class_index_map FILE), or fewer class folders")
    if k < n_outputs:
        raise UserError(f"the data has {k} class folders but the model has {n_outputs} outputs: say which output "
                        f"each folder is with --class_index_map FILE (JSON {{\"folder\": index}} or 'folder index' "
                        f"lines; folders named by ImageNet WordNet ids are mapped without it)")
    return None, "folder order"
