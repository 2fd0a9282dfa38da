"""Stage 1 benchmark: our pass (head-only backward, store of memory-mappable arrays) against the published
script's algorithm: the parameters left in their default requires_grad state, the image requiring grad,
the whole graph recorded and ``autograd.grad`` of the label logits back to the image (the layer's output
gradient caught by a module backward hook), and three ``torch.save`` per image of per-image views of the
batch tensors (each file stores its whole batch's storage), with the published resume check per batch
and its 8 DataLoader workers.

naive (extra row): back-propagation to the image with frozen parameters, three .pt files per image.

  python -m benchmarks.bench_stage1 [--workdir DIR] [workload flags, see --help]
"""
import os
import shutil

from benchmarks import measure, published_code, workload

MODULE = "benchmarks.bench_stage1"  # run as python -m MODULE (its children too)

STORE_TAG = "bench_resnet50"


def ours_folder(workdir):
    from utils.files import store
    return store.store_folder(os.path.join(workdir, "store_ours"), STORE_TAG)


def naive_folder(workdir):
    return os.path.join(workdir, "store_naive")


def published_folder(workdir):
    """The published store folder: STORE/{model}_channel_importances/ with img{n}_*.pt files."""
    return os.path.join(workdir, "store_published", STORE_TAG + "_channel_importances")


def published_file(folder, n, what):
    """what: channel_importance_layer_wrt_class, target or prediction (the published file names)."""
    return os.path.join(folder, f"img{n}_{what}.pt")


def published_done(wl, workdir):
    return published_file(published_folder(workdir), wl.train_images - 1, "prediction")


def ours(wl, workdir, timer, keep=True):
    import torch

    from utils.data import folders
    from utils.stages import stage1_pass
    from utils.model import loading
    model, conv = workload.build_model()
    ds = wl.dataset(workdir, "train")
    folder = ours_folder(workdir)
    info = dict(model=STORE_TAG, weights="random seed 0", weights_sha256=loading.weights_sha256(model),
                layer=workload.LAYER, layer_geometry=loading.layer_geometry(conv), transform=str(wl.transform()),
                autocast=None, decode="cpu", **folders.dataset_summary(ds))
    for _ in timer.runs():
        shutil.rmtree(folder, ignore_errors=True)
        with timer:
            stage1_pass.run_stage1(model, conv, ds, folder, info,
                              stage1_pass.PassSettings(wl.batch_size, torch.device("cpu"), wl.workers_ours()),
                              log=lambda *a: None)
    size, files = workload.folder_bytes(folder)
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


def published_stage1(wl, model, conv, train_dir, out, batch_size, workers):
    """The published stage 1 on the CPU (algorithm of its get_importances_for_classes.py)."""
    import torch
    from torchvision import datasets
    ds = datasets.ImageFolder(train_dir, wl.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=False)  # pin_memory=True on its GPU; a no-op on the CPU
    os.makedirs(out, exist_ok=True)
    kept, handles = published_code.hooks(conv, want_input=True, want_output=True, want_grad=True)
    for it, (images, targets) in enumerate(loader):
        images.requires_grad = True
        outputs = model(images)
        first = it * batch_size
        # its resume check: skip the batch when every image's prediction file exists
        if all(os.path.isfile(published_file(out, first + b, "prediction")) for b in range(len(images))):
            continue
        target_outputs = torch.gather(outputs, 1, targets.unsqueeze(-1))
        torch.autograd.grad(torch.unbind(target_outputs), images)
        A = (kept["a"] * kept["g"]).sum(dim=(2, 3)).to(torch.float16)
        for b in range(len(images)):
            if os.path.isfile(published_file(out, first + b, "prediction")):
                continue
            torch.save(A[b].detach(), published_file(out, first + b, "channel_importance_layer_wrt_class"))
            torch.save(targets[b].detach(), published_file(out, first + b, "target"))
            torch.save(outputs[b].argmax().detach(), published_file(out, first + b, "prediction"))
    for h in handles:
        h.remove()
    return len(ds)


def published(wl, workdir, timer):
    model, conv = workload.build_model(requires_grad=True)
    out = published_folder(workdir)
    train_dir = os.path.join(workload.data_root(workdir), "train")
    for _ in timer.runs():
        shutil.rmtree(out, ignore_errors=True)
        with timer:
            n = published_stage1(wl, model, conv, train_dir, out, wl.batch_size,
                                 wl.workers_published(workload.PUBLISHED_WORKERS))
    size, files = workload.folder_bytes(out)
    return {"images": n, "store_bytes": size, "store_files": files}


def naive(wl, workdir, timer):
    model, conv = workload.build_model()
    ds = wl.dataset(workdir, "train")
    out = naive_folder(workdir)
    for _ in timer.runs():
        shutil.rmtree(out, ignore_errors=True)
        with timer:
            n = naive_stage1(model, conv, ds, out, wl.batch_size)
    size, files = workload.folder_bytes(out)
    return {"images": n, "store_bytes": size, "store_files": files}


def load_published(wl, workdir):
    """(attributions, targets, predictions) of the published store, float32 / int64 numpy."""
    import numpy as np
    import torch
    folder = published_folder(workdir)
    n = wl.train_images
    A = np.stack([torch.load(published_file(folder, i, "channel_importance_layer_wrt_class")).float().numpy()
                  for i in range(n)])
    t = np.array([int(torch.load(published_file(folder, i, "target"))) for i in range(n)])
    p = np.array([int(torch.load(published_file(folder, i, "prediction"))) for i in range(n)])
    return A, t, p


def check_published(wl, workdir):
    """Our store against the published files: attributions (float16 in both), labels, predictions, and
    the importance decisions at the benchmark's tau."""
    import numpy as np
    st = open_store(workdir)
    A = np.asarray(st["attributions"]).astype(np.float32)
    preds = np.load(os.path.join(ours_folder(workdir), "predictions.npy"))
    B, t, p = load_published(wl, workdir)
    imp = lambda X: X >= wl.tau * np.clip(X, 0, None).sum(axis=1, keepdims=True)  # noqa: E731
    return {"max_rel_diff": float(np.abs(A - B).max() / max(np.abs(A).max(), 1e-30)),
            "same_targets": bool((np.asarray(st["targets"]) == t).all()),
            "same_predictions": bool((preds == p).all()),
            "importance_flips": int((imp(A) != imp(B)).sum())}


def check_naive(workdir):
    """Largest difference between ours and the naive attributions (float16 rounding expected)."""
    import numpy as np
    import torch
    A = np.load(os.path.join(ours_folder(workdir), "attributions.npy")).astype(np.float32)
    files = sorted(f for f in os.listdir(naive_folder(workdir)) if f.endswith("_attributions.pt"))
    B = np.stack([torch.load(os.path.join(naive_folder(workdir), f)).float().numpy() for f in files])
    return float(np.abs(A - B).max() / max(np.abs(A).max(), 1e-30))


def open_store(workdir):
    """Our store's attributions, targets and patch sums (memory-mapped)."""
    import numpy as np
    folder = ours_folder(workdir)
    return {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r")
            for name in ("attributions", "targets", "patch_sums")}


def ensure_stage1(wl, workdir):
    """Make the stage-1 outputs (untimed) that a later stage reads if this benchmark has not run."""
    if not os.path.isfile(os.path.join(ours_folder(workdir), "manifest.json")):
        measure.run_child(MODULE, "ours", workdir)
    if not os.path.isfile(published_done(wl, workdir)):
        measure.run_child(MODULE, "published", workdir)
    if wl.naive and not os.path.isdir(naive_folder(workdir)):
        measure.run_child(MODULE, "naive", workdir)


def run(wl, workdir):
    def per_image(r):
        return {"bytes_per_image": r["store_bytes"] / r["images"], "files_per_image": r["store_files"] / r["images"]}
    row = measure.compare(wl, "1", MODULE, workdir,
                         "attributions (+ our patch sums) of the {ours[images]} train images (published: backward "
                         "to the image, 3 .pt files per image)")
    row["store_bytes_per_image_ours"] = per_image(row["ours"])["bytes_per_image"]
    row["store_bytes_per_image_published"] = per_image(row["published"])["bytes_per_image"]
    row["store_files_per_image_published"] = per_image(row["published"])["files_per_image"]
    row["published_check"] = check_published(wl, workdir)
    pc = row["published_check"]
    print(f"       store bytes/image: ours {row['store_bytes_per_image_ours']:.0f}, published "
          f"{row['store_bytes_per_image_published']:.0f} ({row['store_files_per_image_published']:.0f} files/image, "
          f"batch {wl.batch_size})")
    print(f"       check vs published: max |A_ours - A_published| / max|A| = {pc['max_rel_diff']:.2g}, same labels: "
          f"{pc['same_targets']}, same predictions: {pc['same_predictions']}, importance decisions flipped at "
          f"tau={wl.tau}: {pc['importance_flips']}")
    if "naive" in row:
        row["naive_check"] = {"max_rel_diff": check_naive(workdir)}
        print(f"       check vs naive: max |A_ours - A_naive| / max|A| = {row['naive_check']['max_rel_diff']:.2g}")
    return row


def main(argv=None):
    return measure.main({"ours": ours, "published": published, "naive": naive}, run, __doc__, argv)


if __name__ == "__main__":
    main()
