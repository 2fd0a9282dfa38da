"""Your own model and data without dead ends, and a store that is data only.

A store's manifest never runs code (a factory it names is refused unless --model names it); a --model that
disagrees with the store is one line before any weights load; a state dict that does not fit names its tensors;
stage 1 rerun after a bad image was removed keeps the finished chunks of unchanged images (the store equals a
clean run's) or starts afresh; train/ and val/ class folders are checked before any work; stage 4 finds the store
from STORE/models_disentangled; several stores and no layer named is one line; did-you-mean for names and flags.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from tests import tiny_models
from tests.conftest import make_image_folder
from tests.test_cli import run_inproc
from tests.test_unreadable import one_line_error, raw_bytes
from utils.data import folders
from utils.files import names
from utils.model import loading
from utils.run import cli, context

S1, S2, S3, S4 = ("get_importances_for_classes.py", "get_cosine_similarities.py", "disentangle_channel.py",
                  "get_results.py")
TINY = "tests.tiny_models:tiny_resnet"
RUN = ["--num_workers", "0", "--device", "cpu"]


def twelve_outputs():
    """The tiny ResNet with 12 outputs: more than the 10 class folders of the --class_index_map test."""
    torch.manual_seed(0)
    return tiny_models.TinyResNet(num_classes=12).eval()


def fake_store(store_dir, model, layer="conv3", tag=None):
    """A store folder whose manifest names ``model`` (nothing else in it: the stages must stop before reading)."""
    folder = os.path.join(store_dir, (tag or loading.model_tag(model)) + names.STORE_SUFFIX)
    os.makedirs(folder)
    with open(names.manifest(folder), "w") as f:
        json.dump({"model": model, "weights": "factory", "layer": layer, "complete": True}, f)
    return folder


# ----------------------------------------------------------------------------- a store is data only
def test_a_manifest_factory_is_never_imported(tmp_path):
    """A shared store names a module of its own: stages 2-4 (and --list_layers) refuse in one line naming it,
    quoted, and the module never runs (its marker file does not exist)."""
    marker = tmp_path / "ran"
    (tmp_path / "shared_pwn_i29b.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make():\n    pass\n")
    store = str(tmp_path / "store")
    fake_store(store, "shared_pwn_i29b:make")
    calls = [(S2, "--store_dir", store), (S3, "--store_dir", store, "--channel_disentangle", 1,
                                             "--classes_for_concept1", 0, "--classes_for_concept2", 1),
             (S4, "--model_dir", store, "--channel_of_interest", 1, "--classes_for_concept1", 0,
              "--classes_for_concept2", 1, "--get_quantitative"),
             (S4, "--model_dir", os.path.join(store, "models_disentangled"), "--list_layers")]
    for script, *args in calls:
        line = one_line_error(run_inproc(script, *args, *RUN, cwd=str(tmp_path)))
        assert "--model shared_pwn_i29b:make" in line and "never imported" in line, line
    assert not marker.exists() and "shared_pwn_i29b" not in sys.modules


def test_a_hostile_factory_name_is_shown_escaped(tmp_path):
    store = str(tmp_path / "store")
    fake_store(store, "evil:make\n\u202eerror: all fine", tag="evil")
    line = one_line_error(run_inproc(S2, "--store_dir", store, *RUN, cwd=str(tmp_path)))
    assert "\\n" in line and "\\u202e" in line and "\u202e" not in line


def test_a_torchvision_name_from_the_manifest_is_rebuilt(tmp_path):
    store = str(tmp_path / "store")
    fake_store(store, "resnet18", layer="layer4.1.conv2")
    r = run_inproc(S2, "--store_dir", store, "--list_layers", *RUN)
    assert r.returncode == 0 and "layer4.1.conv2" in r.stdout and "Conv2d and Linear layers of resnet18" in r.stdout


def test_model_that_disagrees_with_the_store_is_refused_before_any_weights(tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    fake_store(store, "mymodel:make", layer="layer4.1.conv2")

    def no_loading(*a, **k):
        raise AssertionError("weights loaded")
    monkeypatch.setattr(loading, "load_model", no_loading)
    line = one_line_error(run_inproc(S4, "--model_dir", os.path.join(store, "models_disentangled"), "--model",
                                     "resnet18", "--channel_of_interest", 1, "--classes_for_concept1", 0,
                                     "--classes_for_concept2", 1, "--get_quantitative", *RUN))
    assert "--model resnet18" in line and "--model mymodel:make" in line


def test_a_state_dict_that_does_not_fit_names_its_tensors(tmp_path):
    model = tiny_models.tiny_resnet()
    state = dict(model.state_dict())
    state["fc.weight"] = torch.zeros(6, 16)          # another head size
    state["fc.bias"] = torch.zeros(6)
    del state["conv3.weight"]                        # missing
    state["extra.weight"] = torch.zeros(2)           # not in the model
    assert loading.state_dict_misfit(model.state_dict(), state) == (
        "2 tensors of another shape (fc.weight (6, 16) in the file, (4, 16) in the model, fc.bias (6) in the file, "
        "(4) in the model); 1 missing from the file (conv3.weight); 1 not in the model (extra.weight)")
    assert loading.state_dict_misfit(model.state_dict(), model.state_dict()) is None
    path = str(tmp_path / "w.pth")
    torch.save(state, path)
    with pytest.raises(cli.UserError, match=r"fc.weight \(6, 16\) in the file, \(4, 16\) in the model"):
        loading.load_model(TINY, path)


# ----------------------------------------------------------------------------- stage 1: no dead ends
def stage1(data, store, *extra):
    return run_inproc(S1, "--data_dir", data, "--store_dir", store, "--model", TINY, "--batch_size", 1,
                      "--chunk_size", 8, "--cpu_threads", 1, *RUN, *extra)


def test_stage1_rerun_after_a_bad_image_was_removed_equals_a_clean_run(tmp_path):
    """A text file named .png in class 3 (row 20 of 25): stage 1 stops after chunks 0 and 1 (rows 0-15); the file
    removed, the rerun keeps them, computes the rest and its arrays equal a clean run's byte for byte."""
    bad = make_image_folder(str(tmp_path / "bad"), train_per_class=6, val_per_class=1, seed=4)
    clean = str(tmp_path / "clean")
    shutil.copytree(bad, clean)
    (tmp_path / "bad" / "train" / "class3" / "img002.png").write_text("not an image\n")
    store, ref = str(tmp_path / "store"), str(tmp_path / "ref")
    line = one_line_error(stage1(bad, store))
    assert "train/class3/img002.png" in line and "rerun to resume" in line
    os.remove(os.path.join(bad, "train", "class3", "img002.png"))
    r = stage1(bad, store)
    assert r.returncode == 0, r.stderr
    assert "images per class: 'class3' 7 stored, 6 now (25 in all stored, 24 now)" in r.stdout and bad not in r.stdout
    assert "keeping the 2 finished chunks" in r.stdout and "2 chunks already done" in r.stdout
    assert stage1(clean, ref).returncode == 0
    assert raw_bytes(store) == raw_bytes(ref)


def test_stage1_rerun_after_a_bad_image_was_replaced_equals_a_clean_run(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=3, val_per_class=1, seed=5)
    good = (tmp_path / "data" / "train" / "class3" / "img001.jpg").read_bytes()
    (tmp_path / "data" / "train" / "class3" / "img001.jpg").write_text("not an image\n")
    store, ref = str(tmp_path / "store"), str(tmp_path / "ref")
    one_line_error(stage1(data, store))
    (tmp_path / "data" / "train" / "class3" / "img001.jpg").write_bytes(good)
    r = stage1(data, store)
    assert r.returncode == 0 and "resuming" in r.stdout and "1 chunks already done" in r.stdout, r.stdout + r.stderr
    assert stage1(data, ref).returncode == 0
    assert raw_bytes(store) == raw_bytes(ref)


def test_stage1_starts_afresh_when_no_finished_chunk_is_worth_keeping(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=6, val_per_class=1, seed=4)
    (tmp_path / "data" / "train" / "class0" / "img001.png").write_text("not an image\n")
    store = str(tmp_path / "store")
    one_line_error(stage1(data, store))
    os.remove(os.path.join(data, "train", "class0", "img001.png"))
    r = stage1(data, store)
    assert r.returncode == 0 and "it has no finished chunk: starting afresh" in r.stdout, r.stdout + r.stderr
    folder = os.path.join(store, "tests_tiny_models_tiny_resnet" + names.STORE_SUFFIX)
    assert json.load(open(names.manifest(folder)))["num_images"] == 24
    assert np.load(os.path.join(folder, "targets.npy")).tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6


def test_a_complete_store_of_other_data_says_what_differs(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=3, val_per_class=1)
    store = str(tmp_path / "store")
    assert stage1(data, store).returncode == 0
    os.remove(os.path.join(data, "train", "class1", "img000.jpg"))
    line = one_line_error(stage1(data, store))
    assert "'class1' 3 stored, 2 now" in line and "num_images" not in line and data not in line


def test_class_folders_of_train_and_val_are_checked_before_any_work(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=2, val_per_class=1)
    shutil.rmtree(os.path.join(data, "val", "class1"))
    store = str(tmp_path / "store")
    line = one_line_error(stage1(data, store))
    assert "val/ lacks 1 class folder: 'class1'" in line
    assert not os.path.exists(store)
    assert folders.split_class_difference(["a", "b"], ["b", "c"]) == (
        "val/ lacks 1 class folder: 'a'; train/ lacks 1 class folder: 'c'")
    assert folders.split_class_difference(["a"], ["a"]) is None


# ----------------------------------------------------------------------------- finding the store
def test_stage4_finds_a_class_index_map_store_from_models_disentangled(tmp_path):
    """10 folders c00..c09, a 12-output model, --class_index_map to stage 1 only: stage 4 given the published
    --model_dir STORE/models_disentangled reads the map, transform and layer from the store and writes the same
    summary as with --model_dir STORE."""
    data = make_image_folder(str(tmp_path / "data"), train_per_class=2, val_per_class=2, num_classes=10, seed=3)
    for split in ("train", "val"):
        for c in range(10):
            os.rename(os.path.join(data, split, f"class{c}"), os.path.join(data, split, f"c{c:02d}"))
    mapping = str(tmp_path / "map.json")
    json.dump({f"c{c:02d}": c + 2 for c in range(10)}, open(mapping, "w"))
    store = str(tmp_path / "store")
    model = ["--model", "tests.test_no_dead_ends:twelve_outputs"]
    job = ["--classes_for_concept1", 0, "--classes_for_concept2", 1]
    for script, args in ((S1, ["--data_dir", data, "--class_index_map", mapping, "--layer_of_interest", "conv2",
                               "--resize", 48, "--crop", 40, "--weights", "none"]),
                         (S3, ["--channel_disentangle", 3, *job, "--exactness_images", 1])):
        r = run_inproc(script, "--store_dir", store, *model, *args, "--batch_size", 8, *RUN)
        assert r.returncode == 0, r.stdout + r.stderr
    summaries = []
    for where in (os.path.join(store, "models_disentangled") + os.sep, store):
        out = str(tmp_path / f"out{len(summaries)}")
        r = run_inproc(S4, "--model_dir", where, *model, "--channel_of_interest", 3, *job, "--get_quantitative",
                       "--out_dir", out, *RUN)
        assert r.returncode == 0, r.stdout + r.stderr
        found = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith("summary.json")]
        assert len(found) == 1
        summaries.append(json.load(open(found[0])))
    assert summaries[0] == summaries[1]
    shutil.rmtree(os.path.join(data, "val", "c07"))  # a store made before stage 1 checked val/: stage 4 says so
    line = one_line_error(run_inproc(S4, "--model_dir", store, *model, "--channel_of_interest", 3, *job,
                                     "--get_quantitative", "--out_dir", str(tmp_path / "out2"), *RUN))
    assert "val/ lacks 1 class folder: 'c07'" in line and line.startswith(f"error: --data_dir {data}"), line


def two_stores(tmp_path):
    store = str(tmp_path / "store")
    fake_store(store, "resnet18", layer="layer4.1.conv2")
    fake_store(store, "resnet18", layer="layer3.1.conv2", tag="resnet18_layer3.1.conv2")
    return store


def flags_of(**given):
    """The flags ``context.store_of_flags`` reads (None: not given)."""
    return dict(dict(model=None, weights=None, layer=None, data_dir=None), **given)


def test_several_stores_and_no_layer_named_is_one_line(tmp_path):
    store = two_stores(tmp_path)
    with pytest.raises(cli.UserError, match="holds 2 stores that fit .*pass --layer_of_interest") as e:
        context.store_of_flags(flags_of(), store, "--store_dir")
    assert "--layer_of_interest layer3.1.conv2" in str(e.value) and "--layer_of_interest layer4.1.conv2" in str(e.value)
    for layer in ("layer3.1.conv2", "last_conv"):  # named, or the default layer named as such
        given = flags_of(layer=layer)
        manifest, missing, values = context.store_of_flags(given, store, "--store_dir")
        assert missing is None and manifest["layer"] == ("layer3.1.conv2" if layer != "last_conv" else
                                                          "layer4.1.conv2")
        assert values["model"] == "resnet18" and given["model"] is None  # the flags given are left as they are


def test_did_you_mean():
    model = tiny_models.tiny_resnet()
    with pytest.raises(cli.UserError, match=r"--layer_of_interest conv4: no such module .*did you mean conv"):
        loading.resolve_layer(model, "conv4")
    with pytest.raises(cli.UserError, match=r"did you mean resnet50"):
        loading._build_architecture("resnet5O")
    import get_cosine_similarities
    p = get_cosine_similarities.build_parser()
    assert p.suggestion("unrecognized arguments: --cos_sim_hig 0.5 --layer x") == (
        "; --cos_sim_hig: did you mean --cos_sim_high?; --layer: did you mean --layer_of_interest?")
    assert p.suggestion("unrecognized arguments: --zzz") == ""


def test_the_data_mismatch_says_what_differs_among_the_keys_compared():
    from utils.files.store import describe_mismatch
    a = {"classes": ["a", "b"], "images_per_class": [3, 3], "files_sha256": "x", "num_images": 6, "model": "m",
         "data_dir": "/d"}
    fewer = dict(a, images_per_class=[3, 2], files_sha256="y", num_images=5)
    every = ("model", "classes", "images_per_class", "files_sha256", "num_images")
    assert describe_mismatch(a, fewer, every) == "dataset (images per class: 'b' 3 stored, 2 now (6 in all stored, 5 now))"
    assert describe_mismatch(a, fewer, ("model", "classes")) == ""  # stage 4's val split against train's counts
    assert describe_mismatch(a, dict(a, files_sha256="y"), every) == (
        "dataset (the same classes and counts, but other image file names)")
    assert describe_mismatch(a, dict(a, classes=["a", "c"], data_dir="/e"), every) == (
        "dataset (class folder 'b' gone; new class folder 'c'; data folder stored /d, now /e)")
