"""The GPU path of stage 1: batched JPEG decoding (--gpu_decode) and its CPU fallback, channels_last and
bfloat16 autocast. The decoding test on CUDA is skipped without a GPU; the decoder's logic is also checked
on the CPU (torchvision decodes there with libjpeg), and the fallback of the script is tested."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.conftest import make_image_folder, run_stage
from utils.data import folders
from utils.data import gpu_decode

TINY = "tests.tiny_models:tiny_resnet"
FOLDER = "tests_tiny_models_tiny_resnet_channel_importances"
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")
LEVEL = 1 / 255 / min(folders.STD)  # one grey level in normalized units


def smooth_image_folder(root, per_class=3, num_classes=2, seed=0):
    """JPEGs of smooth colour gradients of several sizes and one PNG (not a JPEG: decoded on the CPU)."""
    rng = np.random.default_rng(seed)
    sizes = [(300, 400), (257, 256), (512, 341), (224, 224)]
    k = 0
    for c in range(num_classes):
        d = os.path.join(root, "train", f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[k % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            phase = rng.random(3) * 6
            img = 0.5 + 0.4 * np.sin(3 * xx[..., None] + 2 * yy[..., None] + phase)
            arr = (img * 255).astype(np.uint8)
            name = os.path.join(d, f"img{i:02d}")
            if k == 1:
                Image.fromarray(arr).save(name + ".png")
            elif k == 2:
                Image.fromarray(arr[..., 0]).save(name + ".jpg", quality=90)  # greyscale JPEG
            else:
                Image.fromarray(arr).save(name + ".jpg", quality=90)
            k += 1
    return root


@pytest.fixture(scope="module")
def smooth_ds(tmp_path_factory):
    root = smooth_image_folder(str(tmp_path_factory.mktemp("smooth")))
    return folders.image_folder(root, "train")


def decode_all(ds, device, jpegs=None):
    decoder = gpu_decode.GpuDecoder(device, ds.transform, jpegs)
    raw = gpu_decode.RawImageFolder(ds)
    loader = folders.make_loader(raw, folders.batches_of(list(range(len(ds))), 4), 0, device)
    xs, ys = [], []
    for batch in loader:
        x, y = decoder(batch)
        xs.append(x.cpu())
        ys.append(y.cpu())
    return torch.cat(xs), torch.cat(ys), decoder


def cpu_path(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def test_raw_dataset_keeps_order_and_labels(smooth_ds):
    raw = gpu_decode.RawImageFolder(smooth_ds)
    assert len(raw) == len(smooth_ds) and raw.targets == smooth_ds.targets and raw.classes == smooth_ds.classes
    b, y = raw[0]
    with open(smooth_ds.samples[0][0], "rb") as f:
        assert b == f.read() and y == smooth_ds.targets[0]


def test_decoder_logic_on_cpu_matches_cpu_path(smooth_ds):
    """Same decoder code with device='cpu' (libjpeg): within a grey level of PIL's path; the PNG is exact."""
    x, y, decoder = decode_all(smooth_ds, "cpu")
    ref, ref_y = cpu_path(smooth_ds)
    assert x.shape == ref.shape == (len(smooth_ds), 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(y, ref_y)
    assert decoder.cpu_fallbacks == 1
    png = [i for i, (p, _) in enumerate(smooth_ds.samples) if p.endswith(".png")]
    assert torch.equal(x[png], ref[png])
    diff = (x - ref).abs()
    assert float(diff.max()) <= 1.01 * LEVEL, float(diff.max()) / LEVEL
    assert float(diff.mean()) < 0.3 * LEVEL


def test_setup_without_cuda_falls_back(smooth_ds):
    lines = []
    decoder, ds = gpu_decode.setup(smooth_ds, torch.device("cpu"), log=lines.append)
    assert decoder is None and ds is smooth_ds
    assert lines == [gpu_decode.FALLBACK_MESSAGE]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG decoding on the GPU)")
def test_gpu_decoding_close_to_cpu_path(smooth_ds):
    lines = []
    decoder, raw = gpu_decode.setup(smooth_ds, torch.device("cuda"), log=lines.append)
    assert decoder is not None and isinstance(raw, gpu_decode.RawImageFolder)
    assert len(lines) == 1 and decoder.name in ("nvjpeg", "nvimgcodec")  # one line naming the decoder
    assert ("nvImageCodec" if decoder.name == "nvimgcodec" else "nvJPEG") in lines[0]
    x, y, decoder = decode_all(smooth_ds, "cuda", decoder.jpegs)
    ref, ref_y = cpu_path(smooth_ds)
    assert torch.equal(y, ref_y) and decoder.cpu_fallbacks == 1
    diff = (x - ref).abs()
    # nvJPEG's IDCT and chroma upsampling and the GPU resize differ from libjpeg + PIL by a few grey levels
    assert float(diff.mean()) < 1.5 * LEVEL, float(diff.mean()) / LEVEL
    assert float(torch.quantile(diff.flatten()[::7], 0.99)) < 6 * LEVEL
    assert float(diff.max()) < 40 * LEVEL


# ------------------------------------------------------------------ which files nvJPEG gets (header parsing)

def jpeg_bytes(mode="RGB", size=(40, 56), seed=0, **save):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0], "L") if mode == "L" else Image.fromarray(arr, mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def segments(raw):
    """[(marker, start, end)] of the header segments of a JPEG, up to and including SOS."""
    out, pos = [], 2
    while True:
        marker, length = raw[pos + 1], int.from_bytes(raw[pos + 2:pos + 4], "big")
        out.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            return out
        pos += 2 + length


def patch_frame(raw, offset, value):
    """``raw`` with byte ``offset`` of the frame header's data (after the length) set to ``value``."""
    start = next(s for m, s, _ in segments(raw) if m in (0xC0, 0xC1, 0xC2))
    b = bytearray(raw)
    b[start + 4 + offset] = value
    return bytes(b)


def test_routing_of_generated_jpegs():
    rgb, grey = jpeg_bytes("RGB"), jpeg_bytes("L")
    progressive = jpeg_bytes("RGB", progressive=True)
    cmyk = Image.new("CMYK", (32, 24), (10, 200, 30, 40))
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG")
    cmyk = buf.getvalue()
    assert [m for m, _, _ in segments(progressive)].count(0xC2) == 1  # really progressive
    assert gpu_decode.cpu_decode_reason(rgb) is None
    assert gpu_decode.cpu_decode_reason(grey) is None
    assert gpu_decode.cpu_decode_reason(progressive) is None
    assert gpu_decode.cpu_decode_reason(jpeg_bytes("RGB", subsampling=0, optimize=True)) is None
    assert "Adobe" in gpu_decode.cpu_decode_reason(cmyk)
    # without its Adobe segment a CMYK file is still caught by its 4 components
    adobe = [(s, e) for m, s, e in segments(cmyk) if m == 0xEE]
    assert len(adobe) == 1
    no_adobe = cmyk[:adobe[0][0]] + cmyk[adobe[0][1]:]
    assert gpu_decode.cpu_decode_reason(no_adobe) == "4 components (CMYK or YCCK)"
    # an Adobe segment in an RGB file (e.g. RGB stored without the YCbCr transform) also goes to the CPU
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    assert "Adobe" in gpu_decode.cpu_decode_reason(rgb[:2] + app14 + rgb[2:])
    assert gpu_decode.cpu_decode_reason(rgb[:2] + b"\xff\xee\x00\x07Other" + rgb[2:]) is None
    # fill bytes before a marker are allowed
    assert gpu_decode.cpu_decode_reason(rgb[:2] + b"\xff\xff" + rgb[2:]) is None
    # frame headers nvJPEG does not take
    assert gpu_decode.cpu_decode_reason(patch_frame(rgb, 0, 12)) == "12-bit samples"
    assert gpu_decode.cpu_decode_reason(patch_frame(rgb, 5, 2)) == "2 components"
    named_rgb = patch_frame(patch_frame(patch_frame(rgb, 6, ord("R")), 9, ord("G")), 12, ord("B"))
    assert gpu_decode.cpu_decode_reason(named_rgb) == "RGB components without colour transform"
    sof = next(s for m, s, _ in segments(rgb) if m == 0xC0)
    for code in (0xC3, 0xC9, 0xCA, 0xCB, 0xCD):  # lossless, arithmetic-coded
        b = bytearray(rgb)
        b[sof + 1] = code
        assert "frame type" in gpu_decode.cpu_decode_reason(bytes(b)), hex(code)


def test_routing_never_raises_on_bad_bytes():
    rgb = jpeg_bytes("RGB")
    header_end = segments(rgb)[-1][2]
    for k in range(header_end):  # every truncation before the scan's data
        assert gpu_decode.cpu_decode_reason(rgb[:k]) is not None, k
    text = b"not an image at all " * 20
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for raw in (b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\xff\xd9", b"\xff\xd8\x00\x00",
                b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xe0\x00\x01", text, png.getvalue(),
                rgb[:2] + rgb[2:header_end].replace(b"\xff\xc0", b"\xff\xe1")):  # no frame header
        assert gpu_decode.cpu_decode_reason(raw) is not None, raw[:16]
    rng = np.random.default_rng(0)
    for _ in range(300):  # random damage to the headers: any answer, but no exception
        b = bytearray(rgb)
        for pos in rng.integers(2, header_end, size=3):
            b[pos] = rng.integers(0, 256)
        gpu_decode.cpu_decode_reason(bytes(b))
        gpu_decode.cpu_decode_reason(bytes(rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8)))


def test_decoder_sends_cmyk_to_the_cpu(tmp_path):
    """A batch with CMYK, greyscale, progressive and baseline JPEGs: only the CMYK file is decoded by PIL
    (exactly the CPU path), the rest go to torchvision's decoder."""
    d = tmp_path / "train" / "c0"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arr = (rng.random((300, 280, 4)) * 255).astype(np.uint8)
    Image.fromarray(arr, "CMYK").save(d / "a_cmyk.jpg")
    Image.fromarray(arr[..., 0]).save(d / "b_grey.jpg")
    Image.fromarray(arr[..., :3]).save(d / "c_progressive.jpg", progressive=True)
    Image.fromarray(arr[..., :3]).save(d / "d_baseline.jpg")
    ds = folders.image_folder(str(tmp_path), "train")
    decoder = gpu_decode.GpuDecoder("cpu", ds.transform)
    seen = []
    decode = decoder._decode_jpegs
    decoder._decode_jpegs = lambda raws: (seen.extend(raws), decode(raws))[1]
    raw = gpu_decode.RawImageFolder(ds)
    batch = ([raw[i][0] for i in range(4)], torch.tensor(ds.targets))
    x, y = decoder(batch)
    assert decoder.cpu_fallbacks == 1 and [t.numpy().tobytes() for t in seen] == batch[0][1:]
    ref, _ = cpu_path(ds)
    assert torch.equal(x[0], ref[0])
    assert float((x[1:] - ref[1:]).abs().max()) <= 1.01 * LEVEL


def per_image_reference(img):
    """The decoder's arithmetic for one uint8 (3, H, W) image, without batching (the former code path)."""
    from torchvision.transforms import functional as TF
    img = TF.resize(img, [256], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    x = TF.center_crop(img, [224, 224]).float().div_(255)
    mean = torch.tensor(folders.MEAN).view(3, 1, 1)
    std = torch.tensor(folders.STD).view(3, 1, 1)
    return (x - mean) / std


def test_grouped_resize_equals_per_image_resize():
    sizes = [(300, 400), (257, 256), (300, 400), (512, 341), (257, 256), (300, 400), (224, 224), (600, 227)]
    raws = [jpeg_bytes("RGB", size=(w, h), seed=k) for k, (h, w) in enumerate(sizes)]
    decoder = gpu_decode.GpuDecoder("cpu")
    groups = []
    resize = decoder._resize_crop_normalize
    decoder._resize_crop_normalize = lambda imgs: (groups.append(tuple(imgs.shape)), resize(imgs))[1]
    x, y = decoder((raws, torch.arange(len(raws))))
    assert sorted(groups) == sorted([(3, 3, 300, 400), (2, 3, 257, 256), (1, 3, 512, 341), (1, 3, 224, 224),
                                     (1, 3, 600, 227)])
    assert decoder.cpu_fallbacks == 0 and x.shape == (len(raws), 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(y, torch.arange(len(raws)))
    for k, r in enumerate(raws):
        img = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(r), dtype=torch.uint8),
                                         mode=torchvision.io.ImageReadMode.RGB)
        assert img.shape[1:] == sizes[k]
        assert torch.equal(x[k], per_image_reference(img)), k


def test_normalize_uint8_is_to_tensor_and_normalize():
    from torchvision import transforms
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(folders.MEAN, folders.STD)])
    rng = np.random.default_rng(2)
    pils = [Image.fromarray(rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)) for _ in range(5)]
    pils.append(Image.fromarray(np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)))  # every level
    ref = torch.stack([reference(p) for p in pils[:5]])
    u8 = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils[:5]])
    out = folders.normalize_uint8(u8, folders.MEAN, folders.STD)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(folders.normalize_uint8(u8), ref)  # ImageNet mean and std by default
    assert torch.equal(folders.normalize_uint8(u8, torch.tensor(folders.MEAN), torch.tensor(folders.STD)), ref)
    last = torch.from_numpy(np.array(pils[5])).permute(2, 0, 1)
    assert torch.equal(folders.normalize_uint8(last), reference(pils[5]))  # a single (3, H, W) image


# ------------------------------------------------------------------ the script's flags on the CPU

@pytest.fixture(scope="module")
def noise_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("noise")), train_per_class=5, val_per_class=1)


def stage1(root, store_dir, *flags):
    proc = run_stage("get_importances_for_classes.py", "--data_dir", root, "--store_dir", store_dir,
                     "--model", TINY, "--batch_size", "4", "--num_workers", "0", "--device", "cpu", *flags)
    folder = os.path.join(store_dir, FOLDER)
    arrays = {name: np.load(os.path.join(folder, name + ".npy")) for name in ARRAYS}
    with open(os.path.join(folder, "manifest.json")) as f:
        return proc, arrays, json.load(f)


@pytest.fixture(scope="module")
def plain(noise_root, tmp_path_factory):
    return stage1(noise_root, str(tmp_path_factory.mktemp("plain")))


@pytest.mark.slow
def test_gpu_decode_flag_without_cuda_gives_the_cpu_store(noise_root, plain, tmp_path):
    proc, arrays, manifest = stage1(noise_root, str(tmp_path), "--gpu_decode")
    assert proc.stdout.count(gpu_decode.FALLBACK_MESSAGE) == 1
    assert manifest["decode"] == "cpu" and plain[2]["decode"] == "cpu"
    for name in ARRAYS:
        assert arrays[name].tobytes() == plain[1][name].tobytes(), name


@pytest.mark.slow
def test_channels_last_and_bf16_run_on_cpu(noise_root, plain, tmp_path):
    _, ref, ref_manifest = plain
    _, cl, cl_manifest = stage1(noise_root, str(tmp_path / "cl"), "--channels_last")
    assert cl_manifest["autocast"] is None
    np.testing.assert_array_equal(cl["targets"], ref["targets"])
    np.testing.assert_allclose(cl["patch_sums"], ref["patch_sums"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cl["attributions"].astype(np.float32), ref["attributions"].astype(np.float32),
                               rtol=1e-2, atol=1e-3)
    _, bf, bf_manifest = stage1(noise_root, str(tmp_path / "bf"), "--autocast_bf16", "--channels_last")
    assert bf_manifest["autocast"] == "bfloat16"
    np.testing.assert_array_equal(bf["targets"], ref["targets"])
    a, b = ref["attributions"].astype(np.float32), bf["attributions"].astype(np.float32)
    # bfloat16 keeps 8 bits of mantissa: attributions move by about a percent of their scale
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_decoder_marks_undecodable_files_unreadable(smooth_ds):
    """A file neither decoder can read comes back as label UNREADABLE (zeros image); the others are untouched."""
    raw = gpu_decode.RawImageFolder(smooth_ds)
    good, label = raw[0]
    broken = good[:len(good) // 3]  # a truncated JPEG: nvJPEG (here libjpeg on the CPU) and PIL refuse it
    decoder = gpu_decode.GpuDecoder("cpu", smooth_ds.transform)
    images, labels = decoder(([good, b"not an image at all", broken], torch.tensor([label, 1, 1])))
    assert labels.tolist() == [label, folders.UNREADABLE, folders.UNREADABLE]
    assert torch.equal(images[0], decode_all(smooth_ds, "cpu")[0][0])
    assert not images[1].any() and not images[2].any()
