"""Stage 1 benchmark: our pass (head-only backward, store of memory-mappable arrays) against the published
way (back-propagation to the image, three .pt files per image holding slices of the batch tensors).

  python benchmarks/bench_stage1.py [--workdir DIR]
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

STORE_TAG = "bench_resnet50"


def ours_folder(workdir):
    from utils import store
    return store.store_folder(os.path.join(workdir, "store_ours"), STORE_TAG)


def naive_folder(workdir):
    return os.path.join(workdir, "store_naive")


def ours(workdir, timer, keep=True):
    import torch

    from utils import data, importances, models
    model, conv = common.build_model()
    ds = common.dataset(workdir, "train")
    folder = ours_folder(workdir)
    info = dict(model=STORE_TAG, weights="random seed 0", weights_sha256=models.weights_sha256(model),
                layer=common.LAYER, layer_geometry=models.layer_geometry(conv), transform=str(common.transform()),
                autocast=None, decode="cpu", **data.dataset_summary(ds))
    for _ in timer.runs():
        shutil.rmtree(folder, ignore_errors=True)
        with timer:
            importances.run_stage1(model, conv, ds, folder, info, common.BATCH_SIZE, torch.device("cpu"), 0, None,
                                   log=lambda *a: None)
    size, files = common.folder_bytes(folder)
    return {"images": len(ds), "store_bytes": size, "store_files": files}


def naive_stage1(model, conv, ds, out, batch_size):
    """The published way: the whole network's autograd graph down to the image, one backward per batch
    to the image, and three torch.save per image of slices of the batch tensors (each slice saves the
    storage of its whole batch tensor)."""
    import torch
    from torch.utils.data import DataLoader
    os.makedirs(out, exist_ok=True)
    n = 0
    for images, labels in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        images.requires_grad_(True)
        kept = {}

        def hook(module, inputs, output):
            output.retain_grad()
            kept["a"] = output

        h = conv.register_forward_hook(hook)
        logits = model(images)
        h.remove()
        logits.gather(1, labels[:, None]).sum().backward()
        a = kept["a"]
        A = (a * a.grad).sum(dim=(2, 3)).detach().half()
        pred = logits.argmax(dim=1)
        for i in range(len(images)):
            torch.save(A[i], os.path.join(out, f"{n:07d}_attributions.pt"))
            torch.save(labels[i], os.path.join(out, f"{n:07d}_target.pt"))
            torch.save(pred[i], os.path.join(out, f"{n:07d}_prediction.pt"))
            n += 1
    return n


def naive(workdir, timer):
    model, conv = common.build_model()
    ds = common.dataset(workdir, "train")
    out = naive_folder(workdir)
    for _ in timer.runs():
        shutil.rmtree(out, ignore_errors=True)
        with timer:
            n = naive_stage1(model, conv, ds, out, common.BATCH_SIZE)
    size, files = common.folder_bytes(out)
    return {"images": n, "store_bytes": size, "store_files": files}


def check_same(workdir):
    """Largest difference between the two implementations' attributions (float16 rounding expected)."""
    import numpy as np
    import torch
    A = np.load(os.path.join(ours_folder(workdir), "attributions.npy")).astype(np.float32)
    files = sorted(f for f in os.listdir(naive_folder(workdir)) if f.endswith("_attributions.pt"))
    B = np.stack([torch.load(os.path.join(naive_folder(workdir), f)).float().numpy() for f in files])
    return float(np.abs(A - B).max() / max(np.abs(A).max(), 1e-30))


def run(workdir):
    def extra(o, n):
        return {"store_bytes_per_image_ours": o["store_bytes"] / o["images"],
                "store_bytes_per_image_naive": n["store_bytes"] / n["images"],
                "store_files_per_image_naive": n["store_files"] / n["images"],
                "max_rel_diff": check_same(workdir)}
    row = common.compare("1", __file__, workdir,
                         "attributions + patch sums of the train images (naive: backward to the image, "
                         "3 .pt files per image)", extra)
    print(f"       store bytes/image: ours {row['store_bytes_per_image_ours']:.0f}, naive "
          f"{row['store_bytes_per_image_naive']:.0f} ({row['store_files_per_image_naive']:.0f} files/image, "
          f"batch {common.BATCH_SIZE}); max |A_ours - A_naive| / max|A| = {row['max_rel_diff']:.2g}")
    return row


if __name__ == "__main__":
    if not common.child_main({"ours": ours, "naive": naive}):
        common.standalone(run, __doc__)
