"""ImageFolder data with the evaluation transform of the paper, and the loaders over it."""
import hashlib
import os
from collections import Counter

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from .cli import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRANSFORM_DESCRIPTION = "Resize(256) CenterCrop(224) ToTensor Normalize(mean=(0.485,0.456,0.406),std=(0.229,0.224,0.225))"


def eval_transform():
    """Resize the shorter side to 256, center-crop 224, to tensor, ImageNet normalization."""
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def image_folder(data_dir, split, transform=None, loader=None):
    """``torchvision.datasets.ImageFolder`` over ``data_dir/split`` with a clear error if it is missing or empty."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"--data_dir {data_dir}: folder '{root}' not found; pass the ImageFolder root "
                        f"that holds {split}/<class>/<image files>")
    kwargs = {} if loader is None else {"loader": loader}
    try:
        ds = datasets.ImageFolder(root, transform=transform or eval_transform(), **kwargs)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"--data_dir {data_dir}: no images under '{root}' ({str(e).splitlines()[0][:200]})")
    if len(ds) == 0:
        raise UserError(f"--data_dir {data_dir}: '{root}' holds no images")
    return ds


def dataset_summary(ds):
    """What a store was made from: the root, class folder names and images per class (class-index order),
    and the sha256 of the image paths relative to the root (so a moved dataset still matches)."""
    counts = Counter(ds.targets)
    names = "\n".join(os.path.relpath(path, ds.root) for path, _ in ds.samples)
    return {"data_dir": os.path.abspath(os.path.dirname(ds.root)), "classes": list(ds.classes),
            "images_per_class": [counts.get(i, 0) for i in range(len(ds.classes))],
            "files_sha256": hashlib.sha256(names.encode()).hexdigest()}


def check_classes(ds, classes, flag):
    for y in classes:
        if not 0 <= y < len(ds.classes):
            raise UserError(f"{flag}: class {y} is out of range (the data has {len(ds.classes)} classes, "
                            f"0..{len(ds.classes) - 1})")


def indices_of_classes(ds, classes):
    """Dataset indices (ImageFolder order) of the images whose label is in ``classes``."""
    wanted = set(classes)
    return [i for i, y in enumerate(ds.targets) if y in wanted]


def batches_of(indices, batch_size):
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def make_loader(ds, batches, num_workers, device):
    """DataLoader over explicit lists of indices: pinned memory on CUDA, persistent prefetching workers."""
    pin = torch.device(device).type == "cuda"
    kwargs = {}
    if num_workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(ds, batch_sampler=batches, num_workers=num_workers, pin_memory=pin, **kwargs)


def normalize_uint8(images, mean=MEAN, std=STD):
    """uint8 images (B, 3, H, W) or (3, H, W) -> float32, normalized exactly as ToTensor() + Normalize(mean, std).

    The same operations in the same order as torchvision (``x.float().div(255)``, then ``sub(mean).div(std)``
    with float32 mean and std), so the result is bit-identical to the PIL path on the same pixels; this lets
    workers send uint8 (a quarter of the bytes) and the normalization run on the device.
    ``mean``, ``std``: sequences or tensors of 3 values (tensors already on the device avoid a copy).
    """
    x = images.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return x.sub_(m).div_(s)
