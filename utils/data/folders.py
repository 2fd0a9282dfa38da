"""ImageFolder data with the evaluation transform of the paper, and the loaders over it."""
import hashlib
import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from PIL import Image
from torchvision import datasets, transforms

from utils.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE, CROP = 256, 224


@dataclass(frozen=True)
class Transform:
    """The evaluation transform: shorter side to ``resize``, centre crop ``crop`` x ``crop``, ToTensor, then
    ``(x - mean) / std`` per colour. The defaults are the paper's (ImageNet's) and give today's pixels."""
    resize: int = RESIZE
    crop: int = CROP
    mean: tuple = MEAN
    std: tuple = STD

    def __post_init__(self):  # tuples of floats whatever came in (lists from a manifest, ints from flags)
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def describe(self):
        """One line (the manifest's ``transform``): the same text as before these flags for the defaults."""
        def floats(v):
            return ",".join(repr(x) for x in v)
        return (f"Resize({self.resize}) CenterCrop({self.crop}) ToTensor "
                f"Normalize(mean=({floats(self.mean)}),std=({floats(self.std)}))")

    def record(self):
        """JSON-friendly dict (the manifest's ``input_transform``)."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_record(cls, record):
        """The Transform of a manifest's ``input_transform`` (None, as in stores written before it: the defaults)."""
        return cls() if not record else cls(**{k: record[k] for k in ("resize", "crop", "mean", "std")})


DEFAULT_TRANSFORM = Transform()
DEFAULT_BATCH_SIZE = 64  # images per batch (--batch_size's default)
TRANSFORM_DESCRIPTION = DEFAULT_TRANSFORM.describe()


def check_transform(t):
    """Refuse sizes and standard deviations that cannot work (UserError, one line)."""
    if t.crop < 1 or t.resize < 1:
        raise UserError(f"--resize {t.resize} --crop {t.crop}: both must be at least 1")
    if t.crop > t.resize:
        raise UserError(f"--crop {t.crop} is larger than --resize {t.resize}: the centre crop must fit in the "
                        f"resized image (shorter side {t.resize})")
    if len(t.mean) != 3 or len(t.std) != 3:
        raise UserError("--mean and --std take 3 numbers each (red, green, blue)")
    if not all(s > 0 for s in t.std):
        raise UserError(f"--std {' '.join(map(str, t.std))}: every value must be positive")
    return t


def eval_transform(transform=DEFAULT_TRANSFORM):
    """Resize the shorter side to ``transform.resize`` (256), center-crop ``transform.crop`` (224), to tensor,
    normalize with ``transform.mean`` and ``transform.std`` (ImageNet's)."""
    return transforms.Compose([
        transforms.Resize(transform.resize),
        transforms.CenterCrop(transform.crop),
        transforms.ToTensor(),
        transforms.Normalize(transform.mean, transform.std),
    ])


def eval_transform_uint8(transform=DEFAULT_TRANSFORM):
    """``eval_transform`` without its last two steps: uint8 (3, crop, crop). ``normalize_uint8`` on the device
    finishes it, bit-identically (workers then send a quarter of the bytes)."""
    return transforms.Compose([transforms.Resize(transform.resize), transforms.CenterCrop(transform.crop),
                               transforms.PILToTensor()])


UNREADABLE = -1  # the label an item carries when its image file cannot be read


class TolerantImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose items never raise for an unreadable file (truncated, not an image, ...).

    Item i is ``(image, label)`` as usual, or ``(placeholder, UNREADABLE)`` when the file cannot be
    decoded: a DataLoader worker never dies on a bad file, and the main process decides what to do
    (``CheckedLoader``). The placeholder is the transform of a blank image (same shape as the others).
    """

    _placeholder = None

    def make_dataset(self, directory, *args, **kwargs):
        """ImageFolder's file list, after ``check_links``: a symbolic link is followed only within the data
        folder, a loop of links is refused."""
        check_links(directory)
        return super().make_dataset(directory, *args, **kwargs)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except Exception:  # noqa: BLE001 -- any failure to decode means: unreadable
            return self.placeholder(), UNREADABLE
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def placeholder(self):
        if self._placeholder is None:
            blank = Image.new("RGB", (256, 256))
            self._placeholder = self.transform(blank) if self.transform is not None else blank
        return self._placeholder


def _inside(path, folders):
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def check_links(root):
    """Refuse (one line) a symbolic link below the split folder ``root`` that leads out of the data folder (the
    --data_dir, or where ``root`` itself lies when it is a link), or back into a folder above it (a loop:
    ``train/<class>/loop -> .`` would list the class's images again and again). Links within the data folder
    are followed as ImageFolder follows them."""
    data_dir = os.path.dirname(os.path.abspath(root))
    allowed = {os.path.realpath(data_dir), os.path.realpath(root)}
    stack = [(root, (os.path.realpath(root),))]
    while stack:
        folder, chain = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # ImageFolder says what it cannot read
        for entry in entries:
            rel = os.path.relpath(entry.path, data_dir)
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not _inside(target, allowed):
                    raise UserError(f"--data_dir {data_dir}: {rel} is a symbolic link to {target}, outside the data "
                                    f"folder; links are followed only within it: copy the files in, or pass a "
                                    f"--data_dir that holds them")
                if not os.path.isdir(target):
                    continue
                if target in chain:
                    raise UserError(f"--data_dir {data_dir}: {rel} is a symbolic link to a folder above it "
                                    f"({os.path.relpath(target, os.path.realpath(data_dir))}), a loop that would "
                                    f"list the same images again and again; remove the link")
                stack.append((entry.path, chain + (target,)))
            elif entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, chain + (os.path.realpath(entry.path),)))


def unreadable_reason(path):
    """Why ``path`` cannot be read as an RGB image (one line), or None if it can."""
    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def relative_name(ds, index):
    """Path of item ``index`` relative to the --data_dir (e.g. 'train/n01440764/x.JPEG')."""
    return os.path.relpath(ds.samples[index][0], os.path.dirname(ds.root))


def image_folder(data_dir, split, transform=None, loader=None):
    """``TolerantImageFolder`` over ``data_dir/split`` with a clear error if it is missing or empty."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"--data_dir {data_dir}: folder '{root}' not found; pass the ImageFolder root "
                        f"that holds {split}/<class>/<image files>")
    kwargs = {} if loader is None else {"loader": loader}
    try:
        ds = TolerantImageFolder(root, transform=transform or eval_transform(), **kwargs)
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


def class_folders(root):
    """ImageFolder's class folders of ``root`` (its sub-folders, sorted), or None when ``root`` is not a folder."""
    if not os.path.isdir(root):
        return None
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def split_class_difference(train, val):
    """What differs between the class folders ``train`` and ``val`` (two sorted lists of names): one phrase
    naming the folders missing from each side (the first five), or None when they are the same."""
    def some(names):
        return ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    parts = []
    for side, missing in (("val/", sorted(set(train) - set(val))), ("train/", sorted(set(val) - set(train)))):
        if missing:
            parts.append(f"{side} lacks {len(missing)} class folder{'s' if len(missing) > 1 else ''}: {some(missing)}")
    return "; ".join(parts) or None


def check_split_classes(data_dir):
    """Refuse (one line) a --data_dir whose val/ holds other class folders than its train/: a class index is a
    folder's position among the sorted folders, so every later stage needs both splits to have the same ones.
    A data folder without val/ is left to the stage that reads it."""
    train, val = (class_folders(os.path.join(data_dir, split)) for split in ("train", "val"))
    if train is None or val is None:
        return
    diff = split_class_difference(train, val)
    if diff:
        raise UserError(f"--data_dir {data_dir}: {diff}; train/ and val/ need the same class folders (a class "
                        f"index is the position of its folder in sorted order)")


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


def make_loader(ds, batches, num_workers, device, unreadable="error", hint=""):
    """Batches ``(images, labels)`` of ``ds`` over explicit lists of indices (a ``CheckedLoader``).

    Pinned memory on CUDA, persistent prefetching workers. ``unreadable``: what to do with an image
    file that cannot be decoded (only a ``TolerantImageFolder`` reports them):
      'error': stop with a one-line UserError naming the file (relative to --data_dir), plus ``hint``;
      'skip':  leave it out of its batch and list its index in ``loader.skipped``;
      'keep':  yield it as the placeholder with label UNREADABLE (the caller handles it).
    """
    return CheckedLoader(ds, batches, num_workers, device, unreadable, hint)


class CheckedLoader:
    """DataLoader over explicit batches of indices that handles unreadable images (see make_loader)."""

    def __init__(self, ds, batches, num_workers, device, unreadable="error", hint=""):
        if unreadable not in ("error", "skip", "keep"):
            raise ValueError(f"unreadable={unreadable!r}")
        self.ds, self.batches, self.mode, self.hint = ds, batches, unreadable, hint
        self.skipped = []
        pin = torch.device(device).type == "cuda"
        kwargs = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
        if getattr(ds, "collate", None) is not None:  # a dataset may pack its batches itself (gpu_decode)
            kwargs["collate_fn"] = ds.collate
        self.loader = DataLoader(ds, batch_sampler=batches, num_workers=num_workers, pin_memory=pin, **kwargs)

    def __len__(self):
        return len(self.batches)

    def error(self, index):
        """The UserError for the unreadable item ``index``."""
        path = self.ds.samples[index][0]
        why = unreadable_reason(path) or "could not be decoded"
        return UserError(f"cannot read image {relative_name(self.ds, index)} ({why}){self.hint}")

    def __iter__(self):
        for images, labels, _ in self.indexed():
            yield images, labels

    def indexed(self):
        """(images, labels, indices (B,) int64: the dataset index of each image yielded) per batch."""
        for b, (images, labels) in enumerate(self.loader):
            indices = torch.as_tensor(self.batches[b], dtype=torch.int64)
            if self.mode == "keep" or not torch.is_tensor(labels):
                yield images, labels, indices
                continue
            bad = labels == UNREADABLE
            if bool(bad.any()):
                where = [self.batches[b][i] for i in torch.nonzero(bad).flatten().tolist()]
                if self.mode == "error":
                    raise self.error(where[0])
                self.skipped.extend(where)
                images, labels, indices = images[~bad], labels[~bad], indices[~bad]
                if len(labels) == 0:
                    continue
            yield images, labels, indices


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


def default_workers(num_workers):
    """``--num_workers``, or by default the machine's cores shared among the processes of this node
    (torchrun's LOCAL_WORLD_SIZE), at most 8 and at least 1 per process."""
    if num_workers is not None:
        if num_workers < 0:
            raise UserError("--num_workers must be >= 0")
        return num_workers
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, (os.cpu_count() or 1) // local))
