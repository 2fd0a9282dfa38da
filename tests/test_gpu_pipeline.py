"""Stage 1's overlapped GPU decoding (utils/data/overlap.py, packed batches of utils/data/gpu_decode.py), the numerics it
records (decoder, --fast_resize, --deterministic) and --fast_resize (utils/data/cpu_decode.py), on the CPU: the
pipelined decoder gives tensor for tensor what the plain sequential decoder gives; the stream logic is
checked with a recording stand-in for CUDA streams."""
import io
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_image_folder, run_stage, tree_bytes
from tests.test_gpu_path import smooth_image_folder
from utils.data import cpu_decode
from utils.data import folders
from utils.data import gpu_decode
from utils.stages import stage1_pass
from utils.data import overlap
from utils.files import store
from utils.errors import UserError


@pytest.fixture(scope="module")
def smooth_root(tmp_path_factory):
    root = smooth_image_folder(str(tmp_path_factory.mktemp("smooth")), per_class=4)
    bad = os.path.join(root, "train", "class1", "zz_truncated.jpg")
    with open(os.path.join(root, "train", "class0", "img00.jpg"), "rb") as f:
        good = f.read()
    with open(bad, "wb") as f:  # a truncated JPEG: neither decoder can read it
        f.write(good[:len(good) // 3])
    return root


def batches_of(ds, size=3):
    return folders.batches_of(list(range(len(ds))), size)


def sequential(ds, batches):
    """The plain decoder, batch by batch, on lists of file bytes (the path before the pipeline)."""
    decoder = gpu_decode.GpuDecoder("cpu", ds.transform)
    raw = gpu_decode.RawImageFolder(ds)
    out = []
    for b in batches:
        items = [raw[i] for i in b]
        out.append(decoder(([r for r, _ in items], torch.tensor([y for _, y in items]))))
    return out


def test_pack_keeps_the_files_and_routes_like_cpu_decode_reason(smooth_root):
    ds = folders.image_folder(smooth_root, "train")
    raw = gpu_decode.RawImageFolder(ds)
    items = [raw[i] for i in range(len(raw))] + [(b"", 0), (b"not a jpeg", 1)]
    packed, labels = gpu_decode.collate_raw(items)
    assert labels.tolist() == [y for _, y in items]
    assert [t.numpy().tobytes() for t in packed.files()] == [r for r, _ in items]
    assert [packed.raw(i) for i in range(len(items))] == [r for r, _ in items]
    assert packed.gpu_ok.tolist() == [gpu_decode.cpu_decode_reason(r) is None for r, _ in items]
    assert int(packed.offsets[-1]) == sum(len(r) for r, _ in items) == packed.data.numel()
    empty = gpu_decode.pack([])
    assert len(empty) == 0 and empty.files() == [] and empty.offsets.tolist() == [0]


def test_pipelined_decoder_equals_sequential_decoder(smooth_root):
    """Workers pack the batches, a background thread decodes them: the same tensors as the plain decoder."""
    ds = folders.image_folder(smooth_root, "train")
    batches = batches_of(ds)
    expected = sequential(ds, batches)
    raw = gpu_decode.RawImageFolder(ds)
    decoder = gpu_decode.GpuDecoder("cpu", ds.transform)
    loader = folders.make_loader(raw, batches, 2, "cpu", "keep")  # 2 workers: collate_raw runs in them
    got = []
    with overlap.Prefetch(loader, decoder.decode_batch, overlap.NoStreams()) as source:
        for images, labels, ok in source:
            got.append((images, labels, ok))
    assert len(got) == len(expected) == len(batches)
    unreadable = 0
    for (x, y, ok), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert ok.tolist() == (ey != folders.UNREADABLE).tolist()
        unreadable += int((~ok).sum())
    assert unreadable == 1  # the truncated file, found on the host


class RecordingStreams:
    """A stand-in for CudaStreams that records which thread did what, in which order."""

    def __init__(self):
        self.calls, self.inside = [], False
        self.count = 0

    def _log(self, what, *args):
        self.calls.append((what, threading.current_thread().name) + args)

    def thread_setup(self):
        self._log("setup")

    def side(self):
        streams = self

        class Ctx:
            def __enter__(self):
                streams.inside = True

            def __exit__(self, *exc):
                streams.inside = False
        return Ctx()

    def record(self):
        self.count += 1
        self._log("record", self.count)
        return self.count

    def finish(self, event):
        self._log("finish", event)

    def hand_over(self, event, tensors):
        self._log("hand_over", event)


def test_prefetch_orders_events_and_threads():
    streams = RecordingStreams()
    seen_inside = []

    def prepare(batch):
        seen_inside.append(streams.inside)  # prepared on the side stream
        return batch * 10

    with overlap.Prefetch(iter(range(5)), prepare, streams, depth=2) as source:
        out = list(source)
    assert out == [0, 10, 20, 30, 40] and seen_inside == [True] * 5
    main = threading.current_thread().name
    producer = [c for c in streams.calls if c[0] in ("setup", "record", "finish")]
    assert producer[0][0] == "setup" and all(c[1] != main for c in producer)
    # each batch: recorded, then finished by the producer before the consumer's stream is handed it
    for k in range(1, 6):
        names = [c[0] for c in streams.calls if c[2:] == (k,)]
        assert names == ["record", "finish", "hand_over"], (k, names)
    assert [c[2] for c in streams.calls if c[0] == "hand_over"] == [1, 2, 3, 4, 5]
    assert all(c[1] == main for c in streams.calls if c[0] == "hand_over")


def test_prefetch_raises_the_producer_error_at_its_batch_and_stops():
    def loader():
        yield 1
        yield 2
        raise ValueError("broken batch 3")

    got = []
    source = overlap.Prefetch(loader(), lambda b: b, overlap.NoStreams())
    with pytest.raises(ValueError, match="broken batch 3"):
        for b in source:
            got.append(b)
    source.close()
    assert got == [1, 2] and not source.thread.is_alive()


def test_prefetch_close_stops_a_producer_that_is_ahead():
    produced = []

    def prepare(b):
        produced.append(b)
        return b

    source = overlap.Prefetch(iter(range(1000)), prepare, overlap.NoStreams(), depth=2)
    it = iter(source)
    assert next(it) == 0
    source.close()
    assert not source.thread.is_alive() and len(produced) < 10


# ------------------------------------------------------------------ the stage on the CPU, pipelined or not

def stage1_store(folder, ds, decoder, model, conv):
    from utils.model import loading
    info = dict(store.fingerprint("tiny", "none", loading.weights_sha256(model), "conv", loading.layer_geometry(conv),
                                  folders.dataset_summary(ds), folders.TRANSFORM_DESCRIPTION),
                autocast=None, decode="gpu", numerics=stage1_pass.numerics("cpu", 1, decoder.name))
    stage1_pass.run_stage1(model, conv, gpu_decode.RawImageFolder(ds), folder, info,
                      stage1_pass.PassSettings(4, torch.device("cpu"), 0, None, gpu_decoder=decoder, skip_unreadable=True),
                      log=lambda *a: None)
    return {n: np.load(os.path.join(folder, n + ".npy")) for n in store.ARRAYS}, store.Store.peek(folder)


def test_stage1_pipelined_store_equals_sequential_store(smooth_root, tmp_path, monkeypatch):
    from tests.tiny_models import tiny_resnet
    from utils.model import loading
    torch.manual_seed(0)
    model = tiny_resnet().eval()
    _, conv = loading.resolve_layer(model, "last_conv")
    ds = folders.image_folder(smooth_root, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # given back below: tests that run stages in this process round with the default
    try:
        piped, manifest = stage1_store(str(tmp_path / "piped"), ds, gpu_decode.GpuDecoder("cpu", ds.transform),
                                       model, conv)

        def plain(loader, prepare, streams, depth=2):  # no thread, no streams: batch after batch
            return (prepare(b) for b in loader)
        monkeypatch.setattr(overlap, "Prefetch", plain)
        seq, _ = stage1_store(str(tmp_path / "seq"), ds, gpu_decode.GpuDecoder("cpu", ds.transform), model, conv)
    finally:
        torch.set_num_threads(threads)
    for name in store.ARRAYS:
        assert piped[name].tobytes() == seq[name].tobytes(), name
    assert manifest["numerics"]["decoder"] == "nvjpeg" and manifest["unreadable"] == ["train/class1/zz_truncated.jpg"]
    assert (piped["predictions"] == -1).sum() == 1


# ------------------------------------------------------------------ numerics in the manifest

SHAPES = {"attributions": ((8, 4), np.float16), "targets": ((8,), np.int64)}


@pytest.mark.parametrize("old, new, words", [
    ({"decoder": "nvjpeg"}, {"decoder": "nvimgcodec"}, ("GPU JPEG decoder nvjpeg", "GPU JPEG decoder nvimgcodec")),
    ({}, {"fast_resize": True}, ("--fast_resize",)),
    ({"deterministic": True}, {}, ("--deterministic",)),
])
def test_resume_under_other_decoder_resize_or_determinism_is_refused(tmp_path, old, new, words):
    folder = str(tmp_path / "s")
    base = {"model": "m", "num_images": 8, "chunk_size": 4}
    store.Store.create_or_resume(folder, dict(base, numerics=stage1_pass.numerics("cpu", 2, **_kw(old))), SHAPES)
    before = tree_bytes(folder)
    with pytest.raises(UserError) as e:
        store.Store.create_or_resume(folder, dict(base, numerics=stage1_pass.numerics("cpu", 2, **_kw(new))), SHAPES)
    msg = str(e.value)
    assert "\n" not in msg and "--allow_mixed_numerics" in msg and all(w in msg for w in words), msg
    assert tree_bytes(folder) == before  # nothing written
    # the same settings resume
    assert store.Store.create_or_resume(folder, dict(base, numerics=stage1_pass.numerics("cpu", 2, **_kw(old))),
                                        SHAPES)[1] == "resume"


def _kw(d):
    return {"decoder": d.get("decoder"), "fast_resize": d.get("fast_resize", False),
            "deterministic": d.get("deterministic", False)}


def test_numerics_without_the_new_settings_are_unchanged():
    assert stage1_pass.numerics("cpu", 3) == {"device": "cpu", "cpu_threads": 3}
    assert stage1_pass.numerics("cpu", 3, "nvjpeg", True, True) == {
        "device": "cpu", "cpu_threads": 3, "decoder": "nvjpeg", "fast_resize": True, "deterministic": True}


@pytest.mark.slow
def test_stage_script_records_fast_resize_and_deterministic(tmp_path):
    root = make_image_folder(str(tmp_path / "d"), train_per_class=2, val_per_class=1, size=(300, 520))
    proc = run_stage("get_importances_for_classes.py", "--data_dir", root, "--store_dir", str(tmp_path / "s"),
                     "--model", "tests.tiny_models:tiny_resnet", "--batch_size", "4", "--num_workers", "0",
                     "--device", "cpu", "--cpu_threads", "1", "--fast_resize", "--deterministic")
    folder = os.path.join(str(tmp_path / "s"), "tests_tiny_models_tiny_resnet_channel_importances")
    manifest = store.Store.peek(folder)
    assert manifest["complete"] and "done: 8 images" in proc.stdout
    assert manifest["numerics"] == {"device": "cpu", "cpu_threads": 1, "fast_resize": True, "deterministic": True}


def test_deterministic_context_restores_the_settings():
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    with stage1_pass.deterministic_algorithms("cpu", True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == before


# ------------------------------------------------------------------ --fast_resize

def noise_jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 60 + 2, w // 60 + 2, 3)) * 255).astype(np.uint8)  # colour cells of ~60 px
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.int16)
    img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path


def brute_force(path, resize=256, crop=224):
    """PIL's draft at the scale worked out here (1/2 when the image is twice the resized size), then PIL's
    resize of the crop's source box, by hand."""
    with Image.open(path) as im:
        w, h = im.size
        rw, rh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        scale = 2 if (w >= 2 * rw and h >= 2 * rh) else 1
        im.draft("RGB", (rw, rh) if scale == 1 else (w // 2, h // 2))
        assert im.size == (-(-w // scale), -(-h // scale))  # libjpeg's scaled size
        rgb = im.convert("RGB")
    w2, h2 = rgb.size
    rw2, rh2 = (resize, int(resize * h2 / w2)) if w2 <= h2 else (int(resize * w2 / h2), resize)
    left, top = int(round((rw2 - crop) / 2.0)), int(round((rh2 - crop) / 2.0))
    sx, sy = w2 / rw2, h2 / rh2
    out = rgb.resize((crop, crop), Image.BILINEAR, box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))
    return torch.from_numpy(np.array(out)).permute(2, 0, 1), scale


@pytest.mark.parametrize("w, h, expected_scale", [(500, 375, 1), (375, 500, 1), (600, 500, 1), (640, 530, 2),
                                                   (1200, 900, 2), (2100, 1050, 2)])
def test_fast_resize_equals_brute_force_and_stays_close(tmp_path, w, h, expected_scale):
    path = noise_jpeg(str(tmp_path / "x.jpg"), w, h, seed=w + h)
    fast = cpu_decode.fast_load(path)
    ref, scale = brute_force(path)
    assert fast.dtype == torch.uint8 and fast.shape == (3, 224, 224) and fast.is_contiguous()
    assert torch.equal(fast, ref)
    with Image.open(path) as im:
        default = folders.eval_transform_uint8()(im.convert("RGB"))
    diff = (fast.int() - default.int()).abs()
    assert scale == expected_scale  # 640 x 530 -> 309 x 256: twice in both directions
    if scale == 1:  # same pixels decoded: only the box's rounding moves a few pixels by one level
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    else:  # decoded at half size: close to the full decode, not equal
        assert 0 < float(diff.float().mean()) < 1.0 and float(torch.quantile(diff.float().flatten(), 0.99)) <= 4


def test_fast_resize_dataset_and_unreadable_placeholder(tmp_path):
    d = tmp_path / "train" / "c0"
    d.mkdir(parents=True)
    noise_jpeg(str(d / "a.jpg"), 600, 450, 1)
    (d / "b.jpg").write_bytes(b"not an image")
    ds = cpu_decode.use_fast_resize(folders.image_folder(str(tmp_path), "train"))
    x, y = ds[0]
    assert torch.equal(x, cpu_decode.fast_load(str(d / "a.jpg"))) and y == 0
    x, y = ds[1]
    assert y == folders.UNREADABLE and x.shape == (3, 224, 224) and x.dtype == torch.uint8 and not x.any()


def test_fast_load_of_a_small_image_is_the_plain_transform(tmp_path):
    path = noise_jpeg(str(tmp_path / "s.jpg"), 200, 150, 3)  # smaller than the resize target
    with Image.open(path) as im:
        default = folders.eval_transform_uint8()(im.convert("RGB"))
    fast = cpu_decode.fast_load(path)
    assert fast.shape == (3, 224, 224)
    assert int((fast.int() - default.int()).abs().max()) <= 1


def test_fast_load_reads_a_file_object_like_a_path(tmp_path):
    path = noise_jpeg(str(tmp_path / "f.jpg"), 800, 600, 4)
    with open(path, "rb") as f:
        from_bytes = cpu_decode.fast_load(io.BytesIO(f.read()))
    assert torch.equal(from_bytes, cpu_decode.fast_load(path))


# ------------------------------------------------------------------ on a CUDA card

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LEVEL = 1 / 255 / min(folders.STD)  # one grey level in normalized units


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    return smooth_image_folder(str(tmp_path_factory.mktemp("clean")), per_class=5)


def former_gpu_decode(raws, labels, device, cpu_transform):
    """--gpu_decode as it was before the pipeline (GpuDecoder.__call__ on a list of file bytes), restated."""
    import collections

    import torchvision
    from torchvision.transforms import functional as TF
    mean = torch.tensor(folders.MEAN, dtype=torch.float32, device=device)
    std = torch.tensor(folders.STD, dtype=torch.float32, device=device)
    gpu = [i for i, r in enumerate(raws) if gpu_decode.cpu_decode_reason(r) is None]
    tensors = [torch.frombuffer(bytearray(raws[i]), dtype=torch.uint8) for i in gpu]
    decoded = dict(zip(gpu, torchvision.io.decode_jpeg(tensors, mode=torchvision.io.ImageReadMode.RGB,
                                                       device=device)))
    rows = [None] * len(raws)
    groups = collections.defaultdict(list)
    for i, img in decoded.items():
        groups[tuple(img.shape[-2:])].append(i)
    for idx in groups.values():
        imgs = TF.resize(torch.stack([decoded[i] for i in idx]), [256],
                         interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        out = folders.normalize_uint8(TF.center_crop(imgs, [224, 224]), mean, std)
        for j, i in enumerate(idx):
            rows[i] = out[j]
    for i, raw in enumerate(raws):
        if rows[i] is None:
            with Image.open(io.BytesIO(raw)) as im:
                rows[i] = cpu_transform(im.convert("RGB")).to(device)
    return torch.stack(rows), labels.to(device)


def pipelined(ds, batches, jpegs, device):
    raw = gpu_decode.RawImageFolder(ds)
    decoder = gpu_decode.GpuDecoder(device, ds.transform, jpegs)
    loader = folders.make_loader(raw, batches, 2, device, "keep")
    out = []
    with overlap.Prefetch(loader, decoder.decode_batch, overlap.streams_for(device)) as source:
        for images, labels, ok in source:
            out.append((images.clone(), labels.clone(), ok))  # cloned on the consumer's stream
    torch.cuda.synchronize(device)
    return out


@cuda_only
def test_cuda_pipelined_nvjpeg_equals_the_former_gpu_decode(clean_root):
    device = torch.device("cuda", 0)
    ds = folders.image_folder(clean_root, "train")
    batches = batches_of(ds, 4)
    got = pipelined(ds, batches, gpu_decode.TorchvisionJpegs(device), device)
    raw = gpu_decode.RawImageFolder(ds)
    assert len(got) == len(batches)
    for (x, y, ok), b in zip(got, batches):
        items = [raw[i] for i in b]
        ex, ey = former_gpu_decode([r for r, _ in items], torch.tensor([t for _, t in items]), device, ds.transform)
        assert torch.equal(x, ex) and torch.equal(y, ey) and ok.all()


@cuda_only
def test_cuda_pipelined_nvimgcodec_equals_its_sequential_calls(clean_root):
    if not gpu_decode.nvimgcodec_available():
        pytest.skip("nvidia-nvimgcodec is not installed")
    device = torch.device("cuda", 0)
    ds = folders.image_folder(clean_root, "train")
    batches = batches_of(ds, 4)
    lines = []
    jpegs = gpu_decode.choose_jpegs(device, "nvimgcodec", lines.append)
    assert jpegs.name == "nvimgcodec" and len(lines) == 1 and "nvImageCodec" in lines[0], lines
    got = pipelined(ds, batches, jpegs, device)
    decoder = gpu_decode.GpuDecoder(device, ds.transform, jpegs)
    raw = gpu_decode.RawImageFolder(ds)
    nvjpeg = gpu_decode.GpuDecoder(device, ds.transform)
    for (x, y, ok), b in zip(got, batches):
        batch = ([raw[i][0] for i in b], torch.tensor([raw[i][1] for i in b]))
        ex, ey = decoder(batch)
        assert torch.equal(x, ex) and torch.equal(y, ey) and ok.all()
        diff = (x - nvjpeg(batch)[0]).abs()  # two decoders: a few grey levels apart
        assert float(diff.mean()) < 1.5 * LEVEL and float(diff.max()) < 40 * LEVEL


@cuda_only
def test_cuda_stage1_pipelined_store_equals_sequential_store(clean_root, tmp_path, monkeypatch):
    from tests.tiny_models import tiny_resnet
    from utils.model import loading
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = tiny_resnet().eval()
    _, conv = loading.resolve_layer(model, "last_conv")
    ds = folders.image_folder(clean_root, "train")

    def run(folder):
        decoder = gpu_decode.GpuDecoder(device, ds.transform)
        info = dict(store.fingerprint("tiny", "none", loading.weights_sha256(model), "conv",
                                      loading.layer_geometry(conv), folders.dataset_summary(ds),
                                      folders.TRANSFORM_DESCRIPTION),
                    autocast=None, decode="gpu", numerics=stage1_pass.numerics(device, None, decoder.name, False, True))
        stage1_pass.run_stage1(model, conv, gpu_decode.RawImageFolder(ds), folder, info,
                          stage1_pass.PassSettings(4, device, 2, None, gpu_decoder=decoder, deterministic=True),
                          log=lambda *a: None)
        return {n: np.load(os.path.join(folder, n + ".npy")) for n in store.ARRAYS}

    piped = run(str(tmp_path / "piped"))
    monkeypatch.setattr(overlap, "Prefetch", lambda loader, prepare, streams, depth=2: (prepare(b) for b in loader))
    seq = run(str(tmp_path / "seq"))
    for name in store.ARRAYS:
        assert piped[name].tobytes() == seq[name].tobytes(), name
    assert (piped["predictions"] >= 0).all()


# ------------------------------------------------------------------ which GPU decoder (mocked: no CUDA here)

class FakeJpegs:
    def __init__(self, device, name="nvjpeg", fail=None):
        if fail:
            raise fail
        self.device, self.name, self.version = device, name, "0.0"


@pytest.mark.parametrize("installed, nv_fails, asked, chosen, words", [
    (True, None, "auto", "nvimgcodec", ("nvImageCodec 0.0",)),
    (False, None, "auto", "nvjpeg", ("torchvision's nvJPEG",)),
    (True, RuntimeError("no hardware decoder\nmore"), "auto", "nvjpeg",
     ("nvImageCodec did not work (RuntimeError: no hardware decoder)", "torchvision's nvJPEG")),
    (False, None, "nvimgcodec", "nvjpeg", ("nvImageCodec is not installed", "torchvision's nvJPEG")),
    (True, None, "nvjpeg", "nvjpeg", ("torchvision's nvJPEG",)),
])
def test_choose_jpegs_says_in_one_line_which_decoder(monkeypatch, installed, nv_fails, asked, chosen, words):
    monkeypatch.setattr(gpu_decode, "nvimgcodec_available", lambda: installed)
    monkeypatch.setattr(gpu_decode, "NvImageCodecJpegs", lambda d: FakeJpegs(d, "nvimgcodec", nv_fails))
    monkeypatch.setattr(gpu_decode, "TorchvisionJpegs", lambda d: FakeJpegs(d))
    monkeypatch.setattr(gpu_decode, "_probe", lambda jpegs: None)
    lines = []
    jpegs = gpu_decode.choose_jpegs(torch.device("cuda", 1), asked, lines.append)
    assert jpegs.name == chosen and jpegs.device == torch.device("cuda", 1)
    assert len(lines) == 1 and all(w in lines[0] for w in words) and "cuda:1" in lines[0], lines


def test_choose_jpegs_without_any_gpu_decoder_says_cpu(monkeypatch):
    monkeypatch.setattr(gpu_decode, "nvimgcodec_available", lambda: False)
    monkeypatch.setattr(gpu_decode, "TorchvisionJpegs", lambda d: FakeJpegs(d, fail=RuntimeError("no nvjpeg")))
    lines = []
    assert gpu_decode.choose_jpegs(torch.device("cuda", 0), "auto", lines.append) is None
    assert len(lines) == 1 and "decoding on the CPU" in lines[0]
