"""A researcher's own model and data: the four stages with the fewest flags, several layers in one folder, the
input transform, class folders against model outputs, stage 2's bounds, --list_layers, flag aliases."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tests import tiny_models
from tests.conftest import make_image_folder, run_script, run_stage, tree_bytes
from tests.test_cli import check_store, reference_pass, run_inproc
from utils.data import classmap
from utils.data import folders
from utils.data.scan import ScanPlan
from utils.model import loading

S1, S2, S3, S4 = ("get_importances_for_classes.py", "get_cosine_similarities.py", "disentangle_channel.py",
                  "get_results.py")
FACTORY = "tests.tiny_models:unseeded_resnet"
TAG = "tests_tiny_models_unseeded_resnet"
RUN = ["--num_workers", "0", "--device", "cpu", "--batch_size", "8"]
CROP, RESIZE = 160, 176           # not the default 224 / 256
FLAGS2 = ["--proportion_attribution_required", "0.1", "--p", "0.5"]
JOB = ["--classes_for_concept1", "0", "--classes_for_concept2", "1"]


def ok(script, *args):
    r = run_inproc(script, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def refused(script, *args):
    """A one-line error with exit status 2; returns the line."""
    r = run_inproc(script, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def trainable(model):
    """The model with gradients on (load_model freezes it; the reference pass differentiates through it)."""
    for prm in model.parameters():
        prm.requires_grad_(True)
    return model


def files(folder):
    return tree_bytes(folder) if os.path.isdir(folder) else {}


def comparable(tree, root):
    """File bytes of a tree with the run's own folder names taken out of the JSON files (paths differ)."""
    out = {}
    for name, blob in tree.items():
        if name.endswith(".lock"):
            continue
        if name.endswith(".json"):
            doc = json.loads(blob)
            if isinstance(doc, dict):
                for key in ("checkpoint", "created", "finished", "data_dir"):
                    doc.pop(key, None)
            blob = json.dumps(doc, sort_keys=True).replace(root, "ROOT").encode()
        out[name] = blob
    return out


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """Stage 1 with the full flags (its own process for conv2; in this one for conv1), then stages 2-4 with only
    the store and their own flags (layer conv2); then the same for layer conv1 into the same --store_dir and
    --out_dir."""
    base = tmp_path_factory.mktemp("newcomer")
    d = make_image_folder(str(base / "data"), train_per_class=6, val_per_class=3, seed=7)
    store, out = str(base / "store"), str(base / "out")
    full = ["--data_dir", d, "--model", FACTORY, "--weights", "none", "--crop", CROP, "--resize", RESIZE]
    snaps = {}
    for layer in ("conv2", "conv1"):
        run = run_script if layer == "conv2" else run_stage  # conv2's rows are checked: a process of its own
        run(S1, *full, "--layer_of_interest", layer, "--store_dir", store, *RUN)
        pick = [] if layer == "conv2" else ["--layer_of_interest", layer]  # two stores now: say which
        # a factory (code) comes from the command line only, never from the store's manifest
        s2 = ok(S2, "--store_dir", store, "--model", FACTORY, "--out_dir", out, *FLAGS2, *pick, *RUN)
        s3 = ok(S3, "--store_dir", store, "--model", FACTORY, "--channel_disentangle", 1, *JOB, *pick, *RUN)
        s4 = ok(S4, "--model_dir", store, "--model", FACTORY, "--channel_of_interest", 1, *JOB, *pick, "--get_quantitative",
                "--get_qualitative", "--out_dir", out, *RUN)
        snaps[layer] = (files(store), files(out), s2, s3, s4)
    return dict(base=str(base), data=d, store=store, out=out, full=full, snaps=snaps)


@pytest.mark.slow
def test_newcomer_second_layer_overwrites_nothing(newcomer):
    store1, out1 = newcomer["snaps"]["conv2"][:2]
    store2, out2 = newcomer["snaps"]["conv1"][:2]
    for before, after in ((store1, store2), (out1, out2)):
        changed = [k for k, v in before.items() if not k.endswith(".lock") and after.get(k) != v]
        assert changed == []
        assert len(after) > len(before)
    for layer in ("conv2", "conv1"):  # each layer's files carry its name, the store included
        assert f"results_get_cosine_similarities/{TAG}_{layer}_required0.1_p0.5_cossim0.0to1.0.txt" in out2
        assert f"{TAG}_{layer}_channel_importances/attributions.npy" in store2
        assert f"models_disentangled/{TAG}_{layer}_channel1_classes1[0]_classes2[1]_f_best_unnormalized.pth" in store2
        assert f"results_quantitative/means_{TAG}_{layer}_required0.1.txt" in out2  # stage 2's tau, from its record
        assert f"results_disentanglement/density_concept1_{TAG}_{layer}.txt" in out2
        man = json.loads(store2[f"{TAG}_{layer}_channel_importances/manifest.json"])
        assert man["layer"] == layer and man["init_seed"] == loading.INIT_SEED
        assert man["input_transform"] == {"resize": RESIZE, "crop": CROP, "mean": list(folders.MEAN), "std": list(folders.STD)}
    assert not [k for k in out2 if k.startswith("results_quantitative/means_required")]  # no mixed registry


@pytest.mark.slow
def test_newcomer_store_holds_the_seeded_model_at_the_given_crop(newcomer):
    """Stage 1 ran in its own process: its rows are those of the factory built here under the fixed seed, on
    images resized to RESIZE and cropped to CROP (an independent torchvision pipeline)."""
    torch.manual_seed(1234)  # whatever the caller's random state
    model, weights_id = loading.load_model(FACTORY, "none")
    assert weights_id == "none"
    torch.manual_seed(99)
    again, _ = loading.load_model(FACTORY, "none")
    assert loading.weights_sha256(model) == loading.weights_sha256(again)
    assert loading.weights_sha256(model) != loading.weights_sha256(tiny_models.unseeded_resnet())  # seed 99's draw
    tf = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(), T.Normalize(folders.MEAN, folders.STD)])
    base = os.path.join(newcomer["data"], "train")
    images, labels = [], []
    for y, name in enumerate(sorted(os.listdir(base))):
        for f in sorted(os.listdir(os.path.join(base, name))):
            with Image.open(os.path.join(base, name, f)) as im:
                images.append(tf(im.convert("RGB")))
            labels.append(y)
    ref = reference_pass(trainable(model), model.conv2, torch.stack(images), np.asarray(labels))
    assert ref.x.shape[-1] == CROP // 8  # the stem (stride 4) and pooling (2) of the crop, not of 224
    check_store(os.path.join(newcomer["store"], f"{TAG}_conv2_channel_importances"), ref, model.conv2, 4)


@pytest.mark.slow
def test_newcomer_numbers_equal_a_run_with_the_full_flags(newcomer):
    """Stages 2-4 with every flag given (into another store and output folder) write the same files, byte for
    byte, as the newcomer's runs with the store alone (layer conv2)."""
    base = newcomer["base"]
    store, out = os.path.join(base, "full_store"), os.path.join(base, "full_out")
    full = newcomer["full"] + ["--layer_of_interest", "conv2"]
    run_stage(S1, *full, "--store_dir", store, *RUN)  # in this process: the same bytes as the newcomer's own
    ok(S2, *full, "--store_dir", store, "--out_dir", out, *FLAGS2, *RUN)
    ok(S3, *full, "--store_dir", store, "--channel_disentangle", 1, *JOB, *RUN)
    ok(S4, *full, "--model_dir", store, "--channel_of_interest", 1, *JOB, "--get_quantitative", "--get_qualitative",
       "--out_dir", out, *RUN)
    short_store, short_out = newcomer["snaps"]["conv2"][:2]
    assert comparable(files(out), base) == comparable(short_out, base)
    mine = {k: v for k, v in comparable(short_store, base).items() if "conv2" in k}
    theirs = comparable(files(store), base)
    assert mine == {k: v for k, v in theirs.items() if "conv2" in k}
    assert any(k.endswith("attributions.npy") for k in mine) and any(k.endswith("_info.json") for k in mine)


@pytest.mark.slow
def test_stage_refuses_flags_that_disagree_with_the_store(newcomer):
    store = newcomer["store"]
    before = files(store)
    line = refused(S2, "--store_dir", store, "--model", FACTORY, "--layer_of_interest", "conv2", "--crop", "224", *RUN)
    assert "--crop 224" in line and "--crop 160" in line
    line = refused(S2, "--store_dir", store, "--model", FACTORY, *RUN)  # two layers' stores: which one?
    assert "conv1" in line and "conv2" in line and "--layer_of_interest" in line
    line = refused(S3, "--store_dir", store, "--model", FACTORY, "--layer_of_interest", "stem.0", "--channel_disentangle",
                   1, *JOB, *RUN)
    assert "stem.0" in line and "conv2" in line
    assert files(store) == before


def test_factory_with_its_own_random_weights_is_refused(image_root, tmp_path):
    line = refused(S1, "--data_dir", image_root, "--store_dir", str(tmp_path / "s"),
                   "--model", "tests.tiny_models:own_rng_net", *RUN)
    assert "--weights" in line and "state dict" in line
    assert not os.path.exists(tmp_path / "s" / "tests_tiny_models_own_rng_net_channel_importances")


# ----------------------------------------------------------------------------- classes against outputs
def test_wnid_list_is_the_standard_imagenet_order():
    w = classmap.imagenet_wnids()
    assert len(w) == len(set(w)) == 1000 and w == sorted(w)
    assert w[0] == "n01440764" and w[-1] == "n15075141"


def test_class_outputs_rules(tmp_path):
    w = classmap.imagenet_wnids()
    assert classmap.class_outputs(["a", "b"], 2) == (None, "folder order")
    out, how = classmap.class_outputs([w[0], w[417], w[-1]], 1000)
    assert out == [0, 417, 999] and "WordNet" in how
    m = tmp_path / "map.txt"
    m.write_text("# folder index\nb 7\na 3\n")
    assert classmap.class_outputs(["a", "b"], 10, str(m))[0] == [3, 7]
    j = tmp_path / "map.json"
    j.write_text(json.dumps({"a": 0, "b": 1}))
    assert classmap.class_outputs(["a", "b"], 10, str(j))[0] is None  # the folders' own indices
    for classes, n, text in ((["a", "b", "c"], 2, "3 class folders but the model has 2 outputs"),
                             (["a", "b"], 5, "--class_index_map")):
        with pytest.raises(Exception) as e:
            classmap.class_outputs(classes, n)
        assert text in str(e.value)


def wnid_folder(root, wnids, per_class=2):
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for w in wnids:
            os.makedirs(os.path.join(root, split, w))
            for i in range(per_class):
                img = (rng.random((36, 44, 3)) * 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, w, f"{i}.jpg"))
    return root


def test_wnid_folders_with_a_1000_output_model(tmp_path, monkeypatch):
    """Folders named by ImageNet ids: the stored targets are the standard indices (first and last id of the list),
    stage 4's gradients are those of these outputs, and stages 2-4 read the store with folder indices."""
    w = classmap.imagenet_wnids()
    d = wnid_folder(str(tmp_path / "data"), [w[0], w[-1]])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 1000))
    wfile = str(tmp_path / "net.pt")
    torch.save(net.state_dict(), wfile)
    (tmp_path / "wnidnet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=8), torch.nn.ReLU(), "
        "torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), "
        "torch.nn.Linear(6, 1000))\n")
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    monkeypatch.syspath_prepend(str(tmp_path))  # the user's module, importable as from the folder they run in
    try:
        model_flags = ["--model", "wnidnet:make", "--weights", wfile]
        ok(S1, "--data_dir", d, "--store_dir", store, *model_flags, *RUN)
        folder = os.path.join(store, "wnidnet_make_channel_importances")
        targets = np.load(os.path.join(folder, "targets.npy"))
        np.testing.assert_array_equal(targets, [0, 0, 999, 999])
        man = json.load(open(os.path.join(folder, "manifest.json")))
        assert man["class_outputs"] == [0, 999]
        # the attributions differentiate logit 999 for the second folder's images
        model = trainable(loading.load_model("wnidnet:make", wfile)[0])
        tf = folders.eval_transform()
        x = torch.stack([tf(Image.open(os.path.join(d, "train", w[-1], f"{i}.jpg")).convert("RGB")) for i in (0, 1)])
        ref = reference_pass(model, model[2], x, np.asarray([999, 999]))
        A = np.load(os.path.join(folder, "attributions.npy")).astype(np.float64)[2:]
        A_ref = (ref.a * ref.g).sum(dim=(2, 3)).numpy()
        np.testing.assert_allclose(A, A_ref, rtol=2e-3, atol=2e-3 * np.abs(A_ref).max())
        ok(S2, "--store_dir", store, "--model", "wnidnet:make", "--out_dir", out, "--p", "0.5", *RUN)  # folder indices
        hist = json.load(open(os.path.join(store, "results_get_cosine_similarities",
                                           "wnidnet_make_required0.05_histograms.json")))
        assert hist["images_per_class"] == [2, 2] and len(hist["histogram_class_by_channel"]) == 2
        ok(S3, "--store_dir", store, "--model", "wnidnet:make", "--channel_disentangle", 2, *JOB, *RUN)
        ok(S4, "--model_dir", store, "--model", "wnidnet:make", "--channel_of_interest", 2, *JOB, "--get_quantitative",
           "--out_dir", out, *RUN)
        # stage 4's relative attributions differentiate the standard outputs (0 and 999), not logits 0 and 1
        from utils.stages import stage4
        ds = folders.image_folder(d, "val")
        sd = torch.load(os.path.join(store, "models_disentangled", "wnidnet_make_channel2_classes1[0]_classes2[1]_"
                                     "f_best_unnormalized.pth"), weights_only=True)
        f, b = stage4.checkpoint_filters(sd)
        plan = ScanPlan(ds, 8, class_outputs=man["class_outputs"])
        (r,) = stage4.evaluate_many(model, model[2], [(2, f, b, [0, 1])], plan, list(range(len(ds))))
        val = torch.stack([folders.eval_transform()(Image.open(p).convert("RGB")) for p, _ in ds.samples])

        def rel(logits):
            rv = reference_pass(model, model[2], val, np.asarray(logits))
            pos = (rv.a * rv.g).clamp(min=0).sum(dim=(2, 3))
            return (pos[:, 2] / pos.sum(dim=1)).numpy()
        np.testing.assert_allclose(r["rel"], rel([0, 0, 999, 999]), rtol=1e-4, atol=1e-6)
        assert not np.allclose(r["rel"], rel([0, 0, 1, 1]), rtol=1e-3)  # the wrong logits give other numbers
    finally:
        sys.modules.pop("wnidnet", None)


def test_labels_past_the_outputs_are_refused_before_any_row(tmp_path):
    d = make_image_folder(str(tmp_path / "data"), train_per_class=1, val_per_class=1, num_classes=12)
    store = str(tmp_path / "store")
    line = refused(S1, "--data_dir", d, "--store_dir", store, "--model", "tests.tiny_models:ten_outputs", *RUN)
    assert "12 class folders" in line and "10 outputs" in line
    assert not os.path.exists(store) or files(store) == {}


@pytest.mark.parametrize("flags,words", [
    (["--p", "75"], ("--p 75", "(0, 1]")),
    (["--proportion_attribution_required", "3"], ("--proportion_attribution_required 3", "(0, 1]")),
    (["--proportion_attribution_required", "0"], ("--proportion_attribution_required 0", "(0, 1]")),
    (["--cos_sim_low", "0.6", "--cos_sim_high", "0.2"], ("--cos_sim_low 0.6", "low < high")),
    (["--cos_sim_low", "-1.5"], ("--cos_sim_low -1.5", "[-1, 1]")),
    (["--cos_sim_high", "1.5"], ("--cos_sim_high 1.5", "[-1, 1]")),
])
def test_stage2_bounds(tmp_path, flags, words):
    """Checked before the store is even looked at: nothing is written (an empty --store_dir stays empty)."""
    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    line = refused(S2, "--store_dir", str(store), "--out_dir", str(out), *flags, *RUN)
    assert all(w in line for w in words), line
    assert os.listdir(store) == [] and not out.exists()


# ----------------------------------------------------------------------------- flags
def test_list_layers_on_every_script():
    for script in (S1, S2, S3, S4):
        r = ok(script, "--list_layers", "--model", "tests.tiny_models:tiny_resnet")
        lines = r.stdout.splitlines()[1:]
        model = tiny_models.tiny_resnet()
        layers = [(n, tuple(m.weight.shape)) for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert [(x.split()[0], eval(x[x.index("("):x.index(")") + 1])) for x in lines] == layers
        assert [x.split()[0] for x in lines if "last_conv" in x] == ["conv3"]  # the last conv, not the fc head


@pytest.mark.slow
def test_stage3_and_4_take_each_others_flag_names_and_refuse_abbreviations():
    import disentangle_channel
    import get_results
    a = disentangle_channel.build_parser().parse_args(["--model_dir", "/s", "--channel_of_interest", "5"])
    b = get_results.build_parser().parse_args(["--store_dir", "/s", "--channel_disentangle", "5"])
    assert (a.store_dir, a.channel_disentangle) == ("/s", 5) and (b.model_dir, b.channel_of_interest) == ("/s", 5)
    for script, flag in ((S3, "--channel_dis"), (S4, "--get_quant"), (S2, "--proportion")):
        r = run_inproc(script, flag, "1")  # argparse's exit status and message, as a process gives them
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr


def test_store_written_before_the_new_names_and_fields_still_works(image_root, tmp_path):
    """A store of a layer other than the last conv, in the folder name and manifest of before (no layer in the
    name, no input_transform): stages 2 finds it and writes what it writes from a store of today."""
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    flags = ["--data_dir", image_root, "--model", "tests.tiny_models:tiny_resnet", "--layer_of_interest", "conv2"]
    ok(S1, *flags, "--store_dir", store, *RUN)
    ok(S2, *flags, "--store_dir", store, "--out_dir", out, *FLAGS2, *RUN)
    name = "tests_tiny_models_tiny_resnet_conv2_required0.1_p0.5_cossim0.0to1.0.txt"
    now = open(os.path.join(out, "results_get_cosine_similarities", name)).read()
    new = os.path.join(store, "tests_tiny_models_tiny_resnet_conv2_channel_importances")
    old = os.path.join(store, "tests_tiny_models_tiny_resnet_channel_importances")
    os.rename(new, old)
    man = json.load(open(os.path.join(old, "manifest.json")))
    del man["input_transform"]
    json.dump(man, open(os.path.join(old, "manifest.json"), "w"))
    os.remove(os.path.join(out, "results_get_cosine_similarities", name))
    ok(S2, "--store_dir", store, "--model", flags[3], "--out_dir", out, *FLAGS2, *RUN)  # and the store's other flags
    assert open(os.path.join(out, "results_get_cosine_similarities", name)).read() == now
    line = refused(S2, "--store_dir", store, "--model", flags[3], "--crop", "200", *RUN)  # missing: the default
    assert "--crop 224" in line


@pytest.mark.slow
def test_feature_visualization_sees_the_store_crop(newcomer):
    """Stage 4's feature visualizations at the store's transform (crop 160 after resize 176): their activation
    matrix is that of the images seen through this transform, and every val crop box lies inside 160 x 160."""
    from utils.featurevis import objectives, render
    out = os.path.join(newcomer["base"], "fv_out")
    ok(S4, "--model_dir", newcomer["store"], "--model", FACTORY, "--layer_of_interest", "conv2", "--channel_of_interest",
       1, *JOB,
       "--get_feature_vis", "--fv_size", 48, "--fv_steps", 2, "--fv_crops", 2, "--fv_spectrum_images", 8,
       "--out_dir", out, *RUN)
    run = f"{TAG}_conv2_channel1_classes1[0]_classes2[1]_f_best_unnormalized"
    rec = json.load(open(os.path.join(out, "results_disentanglement", f"{run}_feature_vis.json")))
    assert os.path.isfile(os.path.join(out, "plots", f"feature_vis_{TAG}_conv2.png"))
    images = torch.from_numpy(np.load(os.path.join(out, "results_disentanglement", f"{run}_feature_vis_images.npy")))
    model, _ = loading.load_model(FACTORY, "none")
    sd = torch.load(os.path.join(newcomer["store"], "models_disentangled", run + ".pth"), weights_only=True)
    w, b, _ = objectives.target_filters(model.conv2, 1, sd)
    act = render.activation_matrix(render.ModelInput(model, model.conv2, CROP, RESIZE, folders.MEAN, folders.STD),
                                   w, b, images)
    np.testing.assert_allclose(rec["activation"], act.numpy(), rtol=1e-4, atol=1e-6)
    default = render.activation_matrix(render.ModelInput(model, model.conv2), w, b, images)  # 224 / 256: other numbers
    assert not np.allclose(rec["activation"], default.numpy(), rtol=1e-3)
    boxes = [t["box"] for ts in rec["top_images"].values() for t in ts]
    assert boxes and all(0 <= x0 < x1 <= CROP and 0 <= y0 < y1 <= CROP for x0, y0, x1, y1 in boxes)
