"""Fashion-MNIST: the IDX reader on hand-built files, the ImageFolder it writes, the small ResNet, and the whole
method on the real images at reduced size (skipped when Debian's dataset-fashion-mnist is not installed)."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from demo import fashion_mnist as FM
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DATA = all(os.path.isfile(os.path.join(FM.SOURCE, stem + ".gz")) for pair in FM.FILES.values() for stem in pair)
NEEDS_DATA = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST is not installed under {FM.SOURCE} "
                                                      f"({FM.INSTALL_HINT})")


def idx_bytes(array, magic):
    """The IDX encoding of a uint8 array, written out by hand from the format's description."""
    array = np.asarray(array, dtype=np.uint8)
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    assert head[3] == array.ndim
    return head + array.tobytes()


TRAIN_LABELS = [3, 0, 3, 9, 0, 5, 3, 1, 2, 4, 6, 7, 8]  # every class (ImageFolder refuses an empty class folder)


def planted(labels=TRAIN_LABELS, h=4, w=5):
    """len(labels) images h x w whose pixel (i, r, c) is a known function of (i, r, c), and the labels."""
    i, r, c = np.meshgrid(np.arange(len(labels)), np.arange(h), np.arange(w), indexing="ij")
    images = ((37 * i + 11 * r + 3 * c) % 256).astype(np.uint8)
    return images, np.array(labels, dtype=np.uint8)


def write_source(folder, gz=True, train=None, val=None):
    """The four IDX files of a tiny Fashion-MNIST under ``folder`` (gzip-compressed or plain)."""
    os.makedirs(folder, exist_ok=True)
    train = train or planted()
    val = val or planted([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1])
    for split, (images, labels) in (("train", train), ("val", val)):
        for stem, array, magic in zip(FM.FILES[split], (images, labels), (FM.IMAGE_MAGIC, FM.LABEL_MAGIC)):
            raw = idx_bytes(array, magic)
            path = os.path.join(folder, stem + (".gz" if gz else ""))
            with open(path, "wb") as f:
                f.write(gzip.compress(raw) if gz else raw)
    return train, val


# ----------------------------------------------------------------------------- the IDX reader
@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_returns_the_planted_pixels_and_labels(tmp_path, gz):
    (images, labels), _ = write_source(str(tmp_path), gz=gz)
    got_images, got_labels = FM.load_split("train", str(tmp_path))
    assert got_images.shape == (13, 4, 5) and got_images.dtype == np.uint8
    assert np.array_equal(got_images, images)
    assert got_images[4, 2, 3] == (37 * 4 + 11 * 2 + 3 * 3) % 256
    assert got_labels.tolist() == TRAIN_LABELS


def test_idx_reader_refuses_a_bad_magic_number_in_one_line(tmp_path):
    images, _ = planted()
    raw = bytearray(idx_bytes(images, FM.IMAGE_MAGIC))
    with pytest.raises(UserError) as e:
        FM.parse_idx(bytes(raw), "x.idx", FM.LABEL_MAGIC)  # an image file where labels are expected
    assert "magic number 0x00000803, expected 0x00000801" in str(e.value) and "\n" not in str(e.value)
    raw[2] = 0x0D  # float values: not the unsigned bytes these files hold
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match="magic number 0x00000d03"):
        FM.read_idx(str(path), FM.IMAGE_MAGIC)


def test_idx_reader_refuses_a_body_that_does_not_match_the_sizes():
    images, _ = planted()
    raw = idx_bytes(images, FM.IMAGE_MAGIC)
    with pytest.raises(UserError, match=r"259 bytes of data, the header's sizes \[13, 4, 5\] need 260"):
        FM.parse_idx(raw[:-1], "x", FM.IMAGE_MAGIC)
    with pytest.raises(UserError, match="truncated header"):
        FM.parse_idx(raw[:9], "x", FM.IMAGE_MAGIC)


def test_images_and_labels_must_agree_in_number(tmp_path):
    images, labels = planted()
    write_source(str(tmp_path), train=(images, labels[:5]))
    with pytest.raises(UserError, match="holds 13 images but .* 5 labels"):
        FM.load_split("train", str(tmp_path))


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(FM, "SOURCE", str(tmp_path / "not_installed"))
    with pytest.raises(UserError) as e:
        FM.load_split("train")
    assert str(e.value).endswith("apt-get install dataset-fashion-mnist") and "\n" not in str(e.value)


@pytest.mark.slow
def test_command_line_error_is_one_line_and_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "demo.fashion_mnist", str(tmp_path / "out"), "--source",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no train-images-idx3-ubyte.gz" in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the ImageFolder
def test_folder_names_sort_in_label_order():
    names = FM.folder_names()
    assert names[0] == "0_tshirt_top" and names[9] == "9_ankle_boot" and len(set(names)) == 10
    assert sorted(names) == names


def test_image_folder_names_counts_and_pixels(tmp_path):
    from utils.data import folders
    (images, labels), (vimages, vlabels) = write_source(str(tmp_path / "src"))
    out = str(tmp_path / "folder")
    names = FM.write_image_folder(out, source=str(tmp_path / "src"), log=lambda s: None)
    for split, imgs, labs in (("train", images, labels), ("val", vimages, vlabels)):
        assert sorted(os.listdir(os.path.join(out, split))) == names  # every class folder, also empty ones
        counts = {name: len(os.listdir(os.path.join(out, split, name))) for name in names}
        assert counts == {name: int((labs == k).sum()) for k, name in enumerate(names)}
        for i, (img, y) in enumerate(zip(imgs, labs)):
            with Image.open(os.path.join(out, split, names[y], f"{i:05d}.png")) as im:
                assert im.mode == "L" and np.array_equal(np.asarray(im), img)
    # torchvision's loader: three equal channels, the label = the class index of the folder
    ds = folders.image_folder(out, "train", transform=lambda im: torch.as_tensor(np.array(im)))
    assert ds.classes == names
    for (path, y), (x, _) in zip(ds.samples, ds):
        i = int(os.path.basename(path)[:5])
        assert y == labels[i] and x.shape == (4, 5, 3)
        assert all(np.array_equal(x[..., ch].numpy(), images[i]) for ch in range(3))


def test_image_folder_first_n_per_class_and_reuse(tmp_path):
    (images, labels), _ = write_source(str(tmp_path / "src"))
    out = str(tmp_path / "folder")
    names = FM.write_image_folder(out, train_per_class=1, source=str(tmp_path / "src"), log=lambda s: None)
    files = {name: sorted(os.listdir(os.path.join(out, "train", name))) for name in names}
    # labels TRAIN_LABELS: the first image of class 3 is image 0, of class 0 image 1, ...
    assert files[names[3]] == ["00000.png"] and files[names[0]] == ["00001.png"]
    assert files[names[9]] == ["00003.png"] and files[names[5]] == ["00005.png"]
    assert files[names[8]] == ["00012.png"] and sum(map(len, files.values())) == 10
    stamp = os.path.getmtime(os.path.join(out, "train", names[3], "00000.png"))
    FM.write_image_folder(out, train_per_class=1, source=str(tmp_path / "src"), log=lambda s: None)  # same: kept
    assert os.path.getmtime(os.path.join(out, "train", names[3], "00000.png")) == stamp
    FM.write_image_folder(out, source=str(tmp_path / "src"), log=lambda s: None)  # another size: rewritten
    assert len(os.listdir(os.path.join(out, "train", names[3]))) == 3


def test_bad_source_damages_nothing_written(tmp_path):
    write_source(str(tmp_path / "src"))
    out = str(tmp_path / "folder")
    FM.write_image_folder(out, source=str(tmp_path / "src"), log=lambda s: None)
    before = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    with open(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(b"\0\0\x08\x01" + (99).to_bytes(4, "big")))  # 99 labels promised, none there
    with pytest.raises(UserError):
        FM.write_image_folder(out, train_per_class=2, source=str(tmp_path / "src"), log=lambda s: None)
    after = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert after == before


def test_pixel_stats_and_groups():
    images = np.array([[[0, 255]], [[255, 255]]], dtype=np.uint8)  # pixels 0, 1, 1, 1
    mean, std = FM.pixel_stats(images)
    assert mean == pytest.approx(0.75) and std == pytest.approx(np.sqrt(0.75 * 0.25))
    groups = FM.class_groups()
    assert (groups >= 0).all() and groups[5] == groups[7] == groups[9] != groups[8]


# ----------------------------------------------------------------------------- the network
def test_layer_of_interest_is_the_last_conv_followed_by_batchnorm_and_the_add():
    from demo import fashion_model as M
    from utils.model import loading
    for name, factory in M.ARCHS.items():
        net = factory().eval()
        path, conv = loading.resolve_layer(net, "last_conv")
        assert path == M.LAYER and conv.module is net.layer_of_interest  # a LayerView of the conv
        x = torch.randn(2, 3, 28, 28)
        bn = loading.batchnorm_after(net, conv, x)
        assert (bn is net.layer3[1].bn3) if "resnet" in name else bn is None
        assert conv.out_channels == int(name[-2:]) and net(x).shape == (2, 10)


def test_grey_input_is_the_mean_of_equal_channels_and_augment_shifts_by_whole_pixels():
    from demo import fashion_model as M
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    x = M.to_input(images.astype(np.uint8))
    assert x.shape == (2, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])
    assert abs(float(x[1, 0, 3, 4]) - (images[1, 3, 4] / 255 - FM.MEAN) / FM.STD) < 1e-6
    assert torch.allclose(M.Grey()(x), x[:, :1], atol=1e-6)
    out = M.augment(x, torch.Generator().manual_seed(0))
    background = -FM.MEAN / FM.STD
    for i in range(2):  # each output is the input (or its mirror image) moved by whole pixels, padded with black
        hits = []
        for src in (x[i], x[i].flip(2)):
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2), value=background)
            hits += [(dy, dx) for dy in range(5) for dx in range(5)
                     if torch.equal(padded[:, dy:dy + 28, dx:dx + 28], out[i])]
        assert len(hits) >= 1


# ----------------------------------------------------------------------------- the whole method, reduced size
REPORT_FIELDS = ("data", "model", "weights", "layer", "training", "test_accuracy", "stage2", "splits", "label_free",
                 "concepts_json", "commands", "seconds")
SPLIT_FIELDS = ("channel", "class1", "class2", "cosine_similarity", "best_rho", "sep_concept1", "sep_concept2",
                "mean_pos_concept1", "mean_pos_concept2", "quantitative_concept1", "quantitative_concept2",
                "max_logit_diff", "max_abs_logit", "logits_unchanged", "checkpoint", "top_images", "plots", "sae_view")
SECONDS = ("conversion", "training", "stage1", "stage2", "stage2_label_free", "total")


def test_recipes_quick_by_default_full_on_request_flags_win():
    from demo.run_fashion import RECIPES, parse_args
    keys = tuple(RECIPES["quick"])
    assert {k: getattr(parse_args([]), k) for k in keys} == RECIPES["quick"]
    assert {k: getattr(parse_args(["--full"]), k) for k in keys} == RECIPES["full"]
    a = parse_args(["--full", "--epochs", "7", "--weakest", "0"])
    assert (a.epochs, a.weakest, a.train_per_class, a.recipe) == (7, 0, None, "full")
    a = parse_args(["--train_per_class", "150"])  # alone: stage 1 reads the images the net trained on
    assert (a.train_per_class, a.store_per_class) == (150, 150)
    assert parse_args(["--train_per_class", "150", "--store_per_class", "40"]).store_per_class == 40


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip(f"Fashion-MNIST is not installed under {FM.SOURCE} ({FM.INSTALL_HINT})")
    from demo import run_fashion
    out = tmp_path_factory.mktemp("fmnist") / "run"
    report = run_fashion.main(["--out", str(out), "--train_per_class", "150", "--val_per_class", "20", "--epochs", "2",
                               "--splits", "1", "--weakest", "0", "--no_feature_vis", "--sae_steps", "50",
                               "--sae_train_images", "200",
                               "--top_n", "40"])
    return out, report


@pytest.mark.slow
@NEEDS_DATA
def test_small_run_report_has_every_field(small_run):
    out, report = small_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert all(k in report for k in REPORT_FIELDS) and all(k in report["seconds"] for k in SECONDS)
    assert report["training"]["train_images"] == 1500 and report["training"]["test_images"] == 10000
    assert report["recipe"] == "quick" and report["data"]["data_dir"] == os.path.join(str(out), "data_150_20")
    for s in report["splits"]:
        assert all(k in s for k in SPLIT_FIELDS)
        assert s["channel"] in {int(c) for c in report["label_free"]}
        for key in ("density_concept1", "density_concept2", "top_images"):
            assert os.path.isfile(s["plots"][key])
    assert "stage3_channel%d" % report["splits"][0]["channel"] in report["seconds"]


def test_strongest_and_weakest_candidates_hand_built():
    from demo.run_fashion import candidate_counts, strongest, weakest
    c = [{"channel": ch, "class1": y1, "class2": y2, "cosine_similarity": cos} for ch, y1, y2, cos in
         [(1, 0, 1, 0.20), (1, 0, 2, 0.90), (2, 0, 1, 0.80), (3, 0, 1, 0.95), (4, 2, 3, 0.20), (4, 1, 2, 0.60)]]
    best = strongest(c, 2)  # lowest cosine per channel; channel breaks the tie at 0.20
    assert [(d["channel"], d["class2"]) for d in best] == [(1, 1), (4, 3)]
    assert [d["channel"] for d in strongest(c, 10)] == [1, 4, 2, 3]
    assert [(d["channel"], d["cosine_similarity"]) for d in weakest(c, 2, {1, 4})] == [(3, 0.95), (2, 0.80)]
    assert weakest(c, 1)[0]["channel"] == 3 and weakest(c, 1, {1, 2, 3, 4}) == []
    assert candidate_counts(c) == {"0.5": {"pairs": 2, "channels": 2}, "0.7": {"pairs": 3, "channels": 2},
                                   "0.9": {"pairs": 4, "channels": 3}}


@pytest.mark.slow
@NEEDS_DATA
def test_small_run_candidate_counts_and_the_strongest_pairs(small_run):
    """The counts below 0.5, 0.7, 0.9 against the candidate file, and the split pair is the lowest cosine."""
    _, report = small_run
    cands = json.loads(open(report["stage2"]["candidates_json"]).read())["candidates"]
    for t in ("0.5", "0.7", "0.9"):
        below = [d for d in cands if d["cosine_similarity"] < float(t)]
        assert report["stage2"]["below"][t] == {"pairs": len(below), "channels": len({d["channel"] for d in below})}
    lowest = min(cands, key=lambda d: d["cosine_similarity"])
    first = report["splits"][0]
    assert (first["channel"], first["class1_index"], first["class2_index"]) == \
        (lowest["channel"], lowest["class1"], lowest["class2"])


@pytest.mark.slow
@NEEDS_DATA
def test_small_run_stages_see_the_training_pixels_and_the_split_is_exact(small_run):
    """The stage scripts' transform (--resize 28 --crop 28 --mean --std) gives the net the tensors it was trained
    on; the disentangled net's logits equal the original's on val images (1e-4 relative), checked here anew."""
    from demo import fashion_model as M
    from utils.data import folders
    from utils import disentangle
    from utils.model import loading
    _, report = small_run
    net, _ = loading.load_model(report["model"], report["weights"])
    t = folders.Transform(28, 28, (FM.MEAN,) * 3, (FM.STD,) * 3)
    ds = folders.image_folder(report["data"]["data_dir"], "val", transform=folders.eval_transform(t))
    idx = list(range(0, len(ds), 10))
    x = torch.stack([ds[i][0] for i in idx])
    images, _ = FM.load_split("val")
    rows = [int(os.path.basename(ds.samples[i][0])[:5]) for i in idx]
    assert torch.allclose(x, M.to_input(images[rows]), atol=1e-6)
    s = report["splits"][0]
    dnet = disentangle.load_disentangled_model(report["model"], report["weights"], "last_conv", s["channel"],
                                               s["checkpoint"])
    with torch.no_grad():
        z, z2 = net(x), dnet(x)
    assert (z2 - z).abs().max() <= 1e-4 * max(1.0, float(z.abs().max()))
    assert s["logits_unchanged"] and s["max_logit_diff"] <= 1e-4 * max(1.0, s["max_abs_logit"])
    # the split maps sum to the channel: D1 + D2 - R = a[c] on these images
    layer = dnet.get_submodule(M.LAYER)
    feats = {}
    hook = net.get_submodule(M.LAYER).register_forward_hook(lambda m, i, o: feats.update(a=o, x=i[0]))
    with torch.no_grad():
        net(x)
        maps = layer[0](feats["x"])
    hook.remove()
    c, k = s["channel"], 16
    assert torch.allclose(maps[:, c] + maps[:, k] - maps[:, k + 1], feats["a"][:, c], atol=1e-4)
