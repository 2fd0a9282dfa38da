"""Optional JPEG decoding on the GPU for stage 1 (``--gpu_decode``).

The DataLoader workers only read the files (``RawImageFolder`` yields the raw bytes and the label) and
pack each batch into one uint8 buffer with the offsets of its files and, per file, whether the GPU may
decode it (``collate_raw``: the header check runs in the workers, and the main process receives one
shared-memory tensor per batch, pinned on the way). ``GpuDecoder`` turns a batch into normalized images
on the device: the JPEGs decoded on the CUDA device, by nvImageCodec when the optional package
``nvidia-nvimgcodec-cu13`` (or ``-cu12``) is installed (the hardware JPEG decoder of A100 / H100 / H200
cards, its CUDA decoder elsewhere) and else by ``torchvision.io.decode_jpeg`` (nvJPEG); then Resize(256)
with antialiasing (one batched resize per group of images of equal size), the center 224 x 224 crop and
the ImageNet normalization, all on the GPU. Stage 1 prepares batch b + 1 this way on a side stream while
batch b computes (utils/data/overlap.py). Files that are not JPEGs, JPEGs whose headers say nvJPEG would refuse or mis-colour them (CMYK/YCCK,
Adobe colour transforms, RGB without YCbCr transform, 12-bit, lossless or arithmetic-coded:
``cpu_decode_reason``), and files nvJPEG fails on anyway are decoded on the CPU with the dataset's own
transform, one by one. The resize and decoder differ slightly from PIL's (a few grey levels at most), so
the store records ``decode='gpu'`` and is not mixed with a CPU-decoded one; the two GPU decoders differ
from each other as well, so the store's numerics record which one (``decoder``: 'nvjpeg' or 'nvimgcodec').
"""
import collections
import io

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as TF

from utils.data import folders

RESIZE, CROP = folders.RESIZE, folders.CROP
FALLBACK_MESSAGE = "--gpu_decode needs CUDA; decoding on the CPU"
DECODERS = ("nvjpeg", "nvimgcodec")


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

    @staticmethod
    def collate(items):
        """The DataLoader's collate function (runs in the workers): ``(PackedJpegs, labels (B,) long)``."""
        return collate_raw(items)


class PackedJpegs:
    """The files of one batch in one buffer: ``data`` (total bytes,) uint8, ``offsets`` (B + 1,) int64 (file
    i is ``data[offsets[i]:offsets[i + 1]]``), ``gpu_ok`` (B,) bool (``cpu_decode_reason`` is None).

    One tensor travels from a worker to the main process per batch (not one per file), and the
    DataLoader pins it on the way (``pin_memory``)."""

    def __init__(self, data, offsets, gpu_ok):
        self.data, self.offsets, self.gpu_ok = data, offsets, gpu_ok

    def __len__(self):
        return len(self.gpu_ok)

    def files(self):
        """The files as a list of 1-D uint8 views into ``data``."""
        if len(self) == 0:
            return []
        return list(torch.split(self.data, torch.diff(self.offsets).tolist()))

    def raw(self, i):
        """File ``i`` as bytes."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.data[lo:hi].numpy().tobytes()

    def pin_memory(self):
        return PackedJpegs(self.data.pin_memory(), self.offsets, self.gpu_ok)


def pack(raws):
    """``PackedJpegs`` of a list of file contents (bytes)."""
    lengths = [len(r) for r in raws]
    offsets = torch.zeros(len(raws) + 1, dtype=torch.int64)
    if raws:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    joined = b"".join(raws)
    data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    gpu_ok = torch.tensor([cpu_decode_reason(r) is None for r in raws], dtype=torch.bool)
    return PackedJpegs(data, offsets, gpu_ok)


def collate_raw(items):
    """``[(bytes, label), ...]`` -> ``(PackedJpegs, labels (B,) long)``."""
    return pack([r for r, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


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
    if len(raw) < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return "not a JPEG"
    frame = None
    for item in _segments(raw):
        if isinstance(item, str):
            return item
        marker, seg = item
        if marker == 0xDA:  # SOS: the entropy-coded data follows
            return "no frame header" if frame is None else None
        if marker == 0xEE and seg[:5] == b"Adobe":
            return "Adobe APP14 marker (CMYK, YCCK or untransformed RGB)"
        if 0xC0 <= marker <= 0xCF and marker not in NOT_FRAMES:
            if frame is not None:
                return "two frame headers"
            reason = _frame_reason(marker, seg)
            if reason:
                return reason
            frame = marker


def _segments(raw):
    """The marker segments of a JPEG's headers after SOI, up to and including the first SOS: yields
    (marker, payload bytes); where the headers are malformed or truncated, a string saying so ends the walk."""
    n, pos = len(raw), 2
    truncated = "malformed or truncated headers"
    while True:
        if pos >= n or raw[pos] != 0xFF:
            yield truncated
            return
        while pos < n and raw[pos] == 0xFF:  # a marker, after optional fill bytes
            pos += 1
        if pos >= n:
            yield truncated
            return
        marker = raw[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0x00, 0xD8, 0xD9):
            yield "malformed headers (no scan)"
            return
        length = (raw[pos] << 8) | raw[pos + 1] if pos + 2 <= n else 0
        if length < 2 or pos + length > n:
            yield truncated
            return
        yield marker, bytes(raw[pos + 2:pos + length])
        if marker == 0xDA:
            return
        pos += length


def _frame_reason(marker, seg):
    """Why a frame header (marker SOFn, payload ``seg``) needs the CPU, or None."""
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
    return None


class TorchvisionJpegs:
    """``torchvision.io.decode_jpeg`` on a list of JPEGs (nvJPEG on a CUDA device, libjpeg on the CPU)."""

    name = "nvjpeg"

    def __init__(self, device):
        self.device = torch.device(device)

    def __call__(self, files):
        """files: list of 1-D uint8 CPU tensors -> list of uint8 (3, H, W) on the device, None where it failed."""
        try:
            return list(torchvision.io.decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the batch: decode one by one
            out = []
            for t in files:
                try:
                    out.append(torchvision.io.decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out


class NvImageCodecJpegs:
    """nvImageCodec's batched decoder on a CUDA card: its hardware JPEG decoder where the card has one (A100,
    H100, H200), else its CUDA decoder; RGB, EXIF orientation not applied (as PIL and torchvision)."""

    name = "nvimgcodec"

    def __init__(self, device):
        from nvidia import nvimgcodec
        self.nv, self.device = nvimgcodec, torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY,
                 nvimgcodec.BackendKind.HYBRID_CPU_GPU)
        self.decoder = nvimgcodec.Decoder(device_id=index, backends=[nvimgcodec.Backend(k) for k in kinds])
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                              allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.I_RGB)
        self.version = getattr(nvimgcodec, "__version__", "?")
        self._alive = None

    def __call__(self, files):
        """files: list of 1-D uint8 CPU tensors -> list of uint8 (3, H, W) on the device, None where it failed."""
        streams = [self.nv.CodeStream(t.numpy()) for t in files]
        stream = torch.cuda.current_stream(self.device)
        images = self.decoder.decode(streams, params=self.params, cuda_stream=stream.cuda_stream)
        self._alive = images  # the decoded buffers outlive this batch's kernels (freed at the next call)
        out = []
        for im in images:
            if im is None:
                out.append(None)
                continue
            t = torch.from_dlpack(im)  # (H, W, 3) uint8 on the card, ordered after the decode on ``stream``
            out.append(t.permute(2, 0, 1) if t.dim() == 3 and t.shape[-1] == 3 else None)
        return out


class GpuDecoder:
    """Callable turning a loader batch ``(files, labels)`` into ``(images, labels)`` on ``device``.

    files: a ``PackedJpegs`` (from ``collate_raw``) or a list of file contents (bytes).
    images: (B, 3, crop, crop) float32, normalized with ``mean`` and ``std``; labels: (B,) long,
    ``folders.UNREADABLE`` where a file cannot be decoded at all (its image is zeros).
    ``cpu_transform``: the dataset's PIL transform, used for the files the GPU decoder cannot take.
    ``device`` may be the CPU (then torchvision decodes with libjpeg on the CPU; used by the tests).
    ``jpegs``: the batched JPEG decoder (default ``TorchvisionJpegs``; ``NvImageCodecJpegs`` on CUDA cards).
    """

    def __init__(self, device, cpu_transform=None, jpegs=None, resize=RESIZE, crop=CROP, mean=folders.MEAN,
                 std=folders.STD):
        self.device = torch.device(device)
        self.cpu_transform = cpu_transform or folders.eval_transform()
        self.jpegs = jpegs or TorchvisionJpegs(self.device)
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.cpu_fallbacks = 0

    @property
    def name(self):
        """'nvjpeg' (torchvision) or 'nvimgcodec': recorded in the store's numerics."""
        return self.jpegs.name

    def _decode_jpegs(self, files):
        """Decoded uint8 (3, H, W) images on the device, None where decoding failed.
        files: list of 1-D uint8 CPU tensors (the file contents)."""
        return self.jpegs(files)

    def _resize_crop_normalize(self, imgs):
        """uint8 (n, 3, H, W) images of one size -> float32 (n, 3, crop, crop), normalized: shorter side to
        ``resize`` (antialiased bilinear), center crop, mean and std; one batched resize for the group."""
        imgs = TF.resize(imgs, [self.resize], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return folders.normalize_uint8(TF.center_crop(imgs, [self.crop, self.crop]), self.mean, self.std)

    def _cpu(self, raw):
        """The file decoded on the CPU with the dataset's transform, or None if it cannot be decoded."""
        self.cpu_fallbacks += 1
        try:
            with Image.open(io.BytesIO(raw)) as im:
                img = self.cpu_transform(im.convert("RGB"))
        except Exception:  # noqa: BLE001 -- unreadable: the caller gets label folders.UNREADABLE
            return None
        return img.to(self.device, non_blocking=True)

    def decode_batch(self, batch):
        """``(images, labels, ok)``: images and labels as ``__call__`` gives them, and ``ok`` (B,) numpy bool
        (False for the unreadable files), known on the host without waiting for the device."""
        packed, labels = batch
        if not isinstance(packed, PackedJpegs):
            packed = pack(list(packed))
        labels = labels.to(self.device, non_blocking=True)
        n = len(packed)
        files = packed.files()
        gpu = torch.nonzero(packed.gpu_ok).flatten().tolist()
        decoded = dict(zip(gpu, self._decode_jpegs([files[i] for i in gpu]))) if gpu else {}
        images = torch.empty((n, 3, self.crop, self.crop), dtype=torch.float32, device=self.device)
        groups = collections.defaultdict(list)  # images of equal size are resized together
        for i, img in decoded.items():
            if img is not None:
                groups[tuple(img.shape[-2:])].append(i)
        for idx in groups.values():
            out = self._resize_crop_normalize(torch.stack([decoded[i] for i in idx]))
            images[torch.tensor(idx, dtype=torch.int64, device=self.device)] = out
        done = {i for idx in groups.values() for i in idx}
        ok = np.ones(n, dtype=bool)
        for i in range(n):
            if i in done:
                continue
            img = self._cpu(packed.raw(i))  # not for the GPU decoder, or it failed on the file
            if img is None:
                ok[i] = False
                images[i] = 0
            else:
                images[i] = img
        if not ok.all():  # unreadable files: the caller decides (stage 1 stops naming the file, or skips it)
            labels = labels.clone()
            labels[torch.from_numpy(np.flatnonzero(~ok)).to(self.device)] = folders.UNREADABLE
        return images, labels, ok

    def __call__(self, batch):
        images, labels, _ = self.decode_batch(batch)
        return images, labels


def nvimgcodec_available():
    """True when the optional package ``nvidia.nvimgcodec`` imports."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception:  # noqa: BLE001 -- not installed, or its libraries do not load
        return False
    return True


def _probe(jpegs):
    """Decode a small generated JPEG with ``jpegs``: raises if the decoder does not work."""
    probe = torchvision.io.encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
    out = jpegs([probe])
    if len(out) != 1 or out[0] is None or tuple(out[0].shape) != (3, 16, 16):
        raise RuntimeError("the probe JPEG did not decode")
    torch.cuda.synchronize(jpegs.device)


def choose_jpegs(device, decoder="auto", log=print):
    """The batched JPEG decoder for ``device`` (CUDA): nvImageCodec when ``decoder`` is 'nvimgcodec', or
    'auto' and the package is installed and works; else torchvision's nvJPEG; None when neither works.
    Says in one line which decoder it chose (and why not nvImageCodec, when it was installed or asked for)."""
    dev = torch.device(device)
    why = ""
    if decoder in ("auto", "nvimgcodec"):
        if not nvimgcodec_available():
            if decoder == "nvimgcodec":
                why = "nvImageCodec is not installed (requirements-gpu.txt); "
        else:
            try:
                jpegs = NvImageCodecJpegs(dev)
                _probe(jpegs)
                log(f"--gpu_decode: decoding JPEGs with nvImageCodec {jpegs.version} on {dev} "
                    f"(its hardware decoder where the card has one)")
                return jpegs
            except Exception as e:  # noqa: BLE001 -- any failure at setup: torchvision's decoder instead
                first = str(e).splitlines()[0][:120] if str(e) else ""
                why = f"nvImageCodec did not work ({type(e).__name__}: {first}); "
    try:  # torchvision built without nvJPEG raises here
        jpegs = TorchvisionJpegs(dev)
        _probe(jpegs)
    except Exception as e:  # noqa: BLE001 -- any failure means: decode on the CPU
        log(f"--gpu_decode: {why}torchvision cannot decode JPEGs on {dev} ({type(e).__name__}); decoding on the CPU")
        return None
    log(f"--gpu_decode: {why}decoding JPEGs with torchvision's nvJPEG on {dev}")
    return jpegs


def setup(dataset, device, log=print, decoder="auto", resize=RESIZE, crop=CROP, mean=folders.MEAN, std=folders.STD):
    """``(decoder, raw dataset)`` for decoding on ``device``; ``(None, dataset)`` with one line of
    explanation where that is not possible (no CUDA device, or no working GPU JPEG decoder).
    ``decoder``: 'auto' (nvImageCodec if installed, else torchvision's nvJPEG), 'nvjpeg' or 'nvimgcodec'."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        log(FALLBACK_MESSAGE)
        return None, dataset
    jpegs = choose_jpegs(dev, decoder, log)
    if jpegs is None:
        return None, dataset
    return GpuDecoder(dev, dataset.transform, jpegs, resize, crop, mean, std), RawImageFolder(dataset)
