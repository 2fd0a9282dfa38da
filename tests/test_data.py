"""CheckedLoader.indexed: every batch whole, in order, with its dataset indices; and its loader freed as soon
as it is dropped (a DataLoader freed by the garbage collector instead waits 5 s per worker)."""
import gc
import weakref

import torch

from utils.data import folders


def test_indexed_yields_the_batches_and_frees_its_loader_without_the_collector(image_root):
    ds = folders.image_folder(image_root, "train")
    batches = [[0, 1, 2], [5, 3], [len(ds) - 1]]
    loader = folders.make_loader(ds, batches, 1, "cpu")
    alive = weakref.ref(loader)
    gc.disable()
    try:
        got = list(loader.indexed())
        del loader
        assert alive() is None  # freed by its reference count: no cycle holds it
    finally:
        gc.enable()
    assert [g[2].tolist() for g in got] == batches
    for (images, labels, idx), b in zip(got, batches):
        assert idx.dtype == torch.int64
        assert torch.equal(images, torch.stack([ds[i][0] for i in b]))
        assert labels.tolist() == [ds.targets[i] for i in b]
