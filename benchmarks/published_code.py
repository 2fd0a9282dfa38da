"""The published scripts' helpers, as the stage benchmarks' ``published`` implementations use them
(docs/published_code.md): how they count and subset the class folders, and their forward and backward hooks."""
import os


def class_counts(split_dir):
    """Images per class folder, by listing each folder (as the published scripts count them)."""
    counts = []
    for _, dirs, _ in os.walk(split_dir):  # walks the class folders too, as published (they have no sub-folders)
        for d in sorted(dirs):
            counts.append(len(os.listdir(os.path.join(split_dir, d))))
    return counts


def subset(wl, split_dir, classes):
    """The published way to get a class's images: a fresh ImageFolder over the whole split (every file
    listed again), then a Subset of the class's index range from the per-folder counts."""
    import torch
    from torchvision import datasets
    counts = class_counts(split_dir)
    ds = datasets.ImageFolder(split_dir, wl.transform())
    keep = []
    for y in classes:
        keep += range(sum(counts[:y]), sum(counts[:y + 1]))
    return torch.utils.data.Subset(ds, keep)


def hooks(module, want_input=False, want_output=False, want_grad=False, store=None):
    """Register the published scripts' hooks on ``module``: forward hooks keeping the (detached) input
    and output, and the deprecated module backward hook keeping the gradient at the output."""
    import warnings
    store = {} if store is None else store
    handles = []
    if want_input:
        handles.append(module.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach())))
    if want_output:
        handles.append(module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach())))
    if want_grad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handles.append(module.register_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0].detach())))
    return store, handles
