"""Optional JPEG decoding on the GPU for stage 1 (``--gpu_decode``).

The DataLoader workers only read the files (``RawImageFolder`` yields the raw bytes and the label);
``GpuDecoder`` turns a batch of them into normalized images on the device: ``torchvision.io.decode_jpeg``
on a list of JPEGs on the CUDA device (nvJPEG), then Resize(256) with antialiasing (one batched resize
per group of images of equal size), the center 224 x 224 crop and the ImageNet normalization, all on the
GPU. Files that are not JPEGs, JPEGs whose headers say nvJPEG would refuse or mis-colour them (CMYK/YCCK,
Adobe colour transforms, RGB without YCbCr transform, 12-bit, lossless or arithmetic-coded:
``cpu_decode_reason``), and files nvJPEG fails on anyway are decoded on the CPU with the dataset's own
transform, one by one. The resize and decoder differ slightly from PIL's (a few grey levels at most), so
the store records ``decode='gpu'`` and is not mixed with a CPU-decoded one.
"""
import collections
import io

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as TF

from . import data

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


GPU_FRAMES = (0xC0, 0xC1, 0xC2)  # SOF0 baseline, SOF1 extended, SOF2 progressive (Huffman coded)
NOT_FRAMES = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC: in the SOF range C0..CF but not frame headers


def cpu_decode_reason(raw):
    """Why the file ``raw`` (bytes) must be decoded on the CPU, or None when nvJPEG may take it.

    Reads only the JPEG headers: walks the marker segments from SOI (FF D8) to the first SOS (FF DA),
    skipping each segment by its length, and never raises. CPU for:
    - not a JPEG (e.g. a PNG named .JPEG), truncated or malformed headers, no frame header before the scan;
    - an APP14 'Adobe' segment (Adobe's colour-transform marker: CMYK and YCCK files, RGB without the
      YCbCr transform);
    - a frame header (SOF0..SOF15 except C4 DHT, C8 JPG, CC DAC) with a component count other than 1 or 3
      (4: CMYK/YCCK), a precision other than 8 bits, a type other than baseline, extended or progressive
      Huffman (lossless, hierarchical, arithmetic-coded), three components named R, G, B (stored without
      colour transform), or a second frame header.
    Greyscale (1 component) and progressive 8-bit YCbCr JPEGs go to nvJPEG.
    """
    n = len(raw)
    if n < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return "not a JPEG"
    pos, frame = 2, None
    while True:
        if pos >= n or raw[pos] != 0xFF:
            return "malformed or truncated headers"
        while pos < n and raw[pos] == 0xFF:  # a marker, after optional fill bytes
            pos += 1
        if pos >= n:
            return "malformed or truncated headers"
        marker = raw[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return "malformed headers (no scan)"
        if pos + 2 > n:
            return "malformed or truncated headers"
        length = (raw[pos] << 8) | raw[pos + 1]
        if length < 2 or pos + length > n:
            return "malformed or truncated headers"
        seg = bytes(raw[pos + 2:pos + length])
        pos += length
        if marker == 0xDA:  # SOS: the entropy-coded data follows
            return "no frame header" if frame is None else None
        if marker == 0xEE and seg[:5] == b"Adobe":
            return "Adobe APP14 marker (CMYK, YCCK or untransformed RGB)"
        if 0xC0 <= marker <= 0xCF and marker not in NOT_FRAMES:
            if frame is not None:
                return "two frame headers"
            if marker not in GPU_FRAMES:
                return f"frame type SOF{marker - 0xC0} (lossless, hierarchical or arithmetic-coded)"
            if len(seg) < 6:
                return "malformed or truncated headers"
            precision, count = seg[0], seg[5]
            if count not in (1, 3):
                return f"{count} components" + (" (CMYK or YCCK)" if count == 4 else "")
            if precision != 8:
                return f"{precision}-bit samples"
            if len(seg) < 6 + 3 * count:
                return "malformed or truncated headers"
            if count == 3 and seg[6:15:3] == b"RGB":
                return "RGB components without colour transform"
            frame = marker


class GpuDecoder:
    """Callable turning a loader batch ``(list of file bytes, labels)`` into ``(images, labels)`` on ``device``.

    images: (B, 3, 224, 224) float32, normalized with the ImageNet mean and std; labels: (B,) long,
    ``data.UNREADABLE`` where a file cannot be decoded at all (its image is zeros).
    ``cpu_transform``: the dataset's PIL transform, used for the files nvJPEG cannot take.
    ``device`` may be the CPU (then torchvision decodes with libjpeg on the CPU; used by the tests).
    """

    def __init__(self, device, cpu_transform=None, transform=None):
        self.device = torch.device(device)
        tf = transform or data.Transform(RESIZE, CROP, data.MEAN, data.STD)  # --resize --crop --mean --std
        self.resize, self.crop = tf.resize, tf.crop
        self.cpu_transform = cpu_transform or data.eval_transform(tf)
        self.mean = torch.tensor(tf.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(tf.std, dtype=torch.float32, device=self.device)
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

    def _resize_crop_normalize(self, imgs):
        """uint8 (n, 3, H, W) images of one size -> float32 (n, 3, 224, 224), normalized: shorter side to 256
        (antialiased bilinear), center crop, ImageNet mean and std; one batched resize for the group."""
        imgs = TF.resize(imgs, [self.resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return data.normalize_uint8(TF.center_crop(imgs, [self.crop, self.crop]), self.mean, self.std)

    def _cpu(self, raw):
        """The file decoded on the CPU with the dataset's transform, or None if it cannot be decoded."""
        self.cpu_fallbacks += 1
        try:
            with Image.open(io.BytesIO(raw)) as im:
                img = self.cpu_transform(im.convert("RGB"))
        except Exception:  # noqa: BLE001 -- unreadable: the caller gets label data.UNREADABLE
            return None
        return img.to(self.device, non_blocking=True)

    def __call__(self, batch):
        raws, labels = batch
        labels = labels.to(self.device, non_blocking=True)
        gpu = [i for i, r in enumerate(raws) if cpu_decode_reason(r) is None]
        decoded = dict(zip(gpu, self._decode_jpegs([raws[i] for i in gpu]))) if gpu else {}
        rows = [None] * len(raws)
        groups = collections.defaultdict(list)  # images of equal size are resized together
        for i, img in decoded.items():
            if img is not None:
                groups[tuple(img.shape[-2:])].append(i)
        for idx in groups.values():
            out = self._resize_crop_normalize(torch.stack([decoded[i] for i in idx]))
            for j, i in enumerate(idx):
                rows[i] = out[j]
        bad = []
        for i, raw in enumerate(raws):
            if rows[i] is None:  # not for nvJPEG, or nvJPEG failed on it
                rows[i] = self._cpu(raw)
                if rows[i] is None:
                    bad.append(i)
                    rows[i] = torch.zeros(3, CROP, CROP, device=self.device)
        if bad:  # unreadable files: the caller decides (stage 1 stops naming the file, or skips it)
            labels = labels.clone()
            labels[bad] = data.UNREADABLE
        return torch.stack(rows), labels


def setup(dataset, device, log=print, transform=None):
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
    return GpuDecoder(dev, dataset.transform, transform), RawImageFolder(dataset)
