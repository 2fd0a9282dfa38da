"""Optional JPEG decoding on the GPU for stage 1 (``--gpu_decode``).

The DataLoader workers only read the files (``RawImageFolder`` yields the raw bytes and the label);
``GpuDecoder`` turns a batch of them into normalized images on the device: ``torchvision.io.decode_jpeg``
on a list of JPEGs with ``device='cuda'`` (nvJPEG), then per image Resize(256) with antialiasing, the
center 224 x 224 crop and the ImageNet normalization, all on the GPU. Files that are not JPEGs, or that
nvJPEG cannot decode (e.g. CMYK JPEGs), are decoded on the CPU with the dataset's own transform, one by one.
The resize and decoder differ slightly from PIL's (a few grey levels at most), so the store records
``decode='gpu'`` and is not mixed with a CPU-decoded one.
"""
import io

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as TF

from . import data

JPEG_MAGIC = b"\xff\xd8\xff"
RESIZE, CROP = 256, 224
FALLBACK_MESSAGE = "--gpu_decode needs CUDA; decoding on the CPU"


class RawImageFolder(torch.utils.data.Dataset):
    """The same images, order and labels as an ImageFolder, yielding ``(file bytes, label)``.

    The bytes are what ``torchvision.io.read_file`` returns, kept as a Python ``bytes`` object so that
    the DataLoader's default collate passes a batch through as a list (files differ in length).
    """

    def __init__(self, folder):
        self.folder = folder
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.class_to_idx = folder.class_to_idx
        self.root, self.transform = folder.root, folder.transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return f.read(), label


def is_jpeg(raw):
    return raw[:3] == JPEG_MAGIC


class GpuDecoder:
    """Callable turning a loader batch ``(list of file bytes, labels)`` into ``(images, labels)`` on ``device``.

    images: (B, 3, 224, 224) float32, normalized with the ImageNet mean and std; labels: (B,) long.
    ``cpu_transform``: the dataset's PIL transform, used for the files nvJPEG cannot take.
    ``device`` may be the CPU (then torchvision decodes with libjpeg on the CPU; used by the tests).
    """

    def __init__(self, device, cpu_transform=None):
        self.device = torch.device(device)
        self.cpu_transform = cpu_transform or data.eval_transform()
        self.mean = torch.tensor(data.MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(data.STD, device=self.device).view(1, 3, 1, 1)
        self.cpu_fallbacks = 0

    def _decode_jpegs(self, raws):
        """Decoded uint8 (3, H, W) images on the device, None where decoding failed."""
        tensors = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
        try:
            return list(torchvision.io.decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batch: decode one by one
            out = []
            for t in tensors:
                try:
                    out.append(torchvision.io.decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _resize_crop(self, img):
        """uint8 (3, H, W) -> float32 (3, 224, 224) in [0, 1]: shorter side to 256 (antialiased), center crop."""
        img = TF.resize(img, [RESIZE], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(img, [CROP, CROP]).float().div_(255)

    def _cpu(self, raw):
        self.cpu_fallbacks += 1
        with Image.open(io.BytesIO(raw)) as im:
            img = self.cpu_transform(im.convert("RGB"))
        return img.to(self.device, non_blocking=True)

    def __call__(self, batch):
        raws, labels = batch
        labels = labels.to(self.device, non_blocking=True)
        jpeg = [i for i, r in enumerate(raws) if is_jpeg(r)]
        decoded = dict(zip(jpeg, self._decode_jpegs([raws[i] for i in jpeg]))) if jpeg else {}
        images, normalized = [], []
        for i, raw in enumerate(raws):
            img = decoded.get(i)
            if img is None:
                images.append(self._cpu(raw))
                normalized.append(True)
            else:
                images.append(self._resize_crop(img))
                normalized.append(False)
        x = torch.stack(images)
        todo = torch.tensor([not n for n in normalized], device=self.device)
        x = torch.where(todo.view(-1, 1, 1, 1), (x - self.mean) / self.std, x)
        return x, labels


def setup(dataset, device, log=print):
    """``(decoder, raw dataset)`` for decoding on ``device``; ``(None, dataset)`` with one line of
    explanation where that is not possible (no CUDA device, or torchvision without GPU JPEG decoding)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        log(FALLBACK_MESSAGE)
        return None, dataset
    try:  # torchvision built without nvJPEG raises here
        probe = torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        torchvision.io.decode_jpeg([probe], device=dev)
    except Exception as e:  # noqa: BLE001 -- any failure means: decode on the CPU
        log(f"--gpu_decode: torchvision cannot decode JPEGs on {dev} ({type(e).__name__}); decoding on the CPU")
        return None, dataset
    return GpuDecoder(dev, dataset.transform), RawImageFolder(dataset)
