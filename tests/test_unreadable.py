"""Unreadable images (issue 7, point 1): a truncated JPEG, a truncated PNG and a text file named .jpg.

Without ``--skip_unreadable`` every stage stops with one line naming the file (relative to --data_dir),
stage 1 after keeping its finished chunks. With it, stage 1 records the files as invalid rows
(prediction -1, zeros, file names in the manifest): the valid rows equal the rows of a store made
from a folder without those files, stages 2 and 3 count without them, stage 4 leaves them out, and a
run that met a bad file, stopped, and was resumed with the flag equals an uninterrupted one byte for byte.
"""
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image_folder, run_inproc, run_stage

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out

TINY = "tests.tiny_models:tiny_resnet"
FOLDER = "tests_tiny_models_tiny_resnet_channel_importances"
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")
RUNTIME = ["--num_workers", "0", "--device", "cpu", "--model", TINY]
S1 = [*RUNTIME, "--cpu_threads", "1"]
# (split, relative path, kind): the bad files of the test data set
BAD = [("train", "train/class1/img002.jpg", "truncated JPEG"),
       ("train", "train/class2/img001.png", "truncated PNG"),
       ("train", "train/class3/img004.jpg", "text named .jpg"),
       ("val", "val/class0/img001.jpg", "truncated JPEG")]
PROGRESS = re.compile(r"\d+%\|")  # tqdm's progress lines, also on stderr


def one_line_error(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    shown = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "Traceback" not in proc.stderr, shown
    return lines[0]


def spoil(root, rel, kind):
    """Replace the image ``rel`` below ``root`` by a broken file of the given kind."""
    path = os.path.join(root, rel)
    if kind == "text named .jpg":
        with open(path, "w") as f:
            f.write("not an image\n")
        return
    with Image.open(path) as im:
        im.load()
        buf = io.BytesIO()
        im.save(buf, "PNG" if path.endswith(".png") else "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """``bad``: 4 classes x 6 train / 3 val with the files of BAD broken; ``clean``: the same without them."""
    base = tmp_path_factory.mktemp("unreadable")
    bad = make_image_folder(str(base / "bad"), train_per_class=6, val_per_class=3, seed=4)
    # one image of class 2 is a PNG, as ImageNet-like folders hold a few
    png = os.path.join(bad, "train/class2/img001")
    with Image.open(png + ".jpg") as im:
        im.save(png + ".png")
    os.remove(png + ".jpg")
    clean = str(base / "clean")
    shutil.copytree(bad, clean)
    for _, rel, kind in BAD:
        spoil(bad, rel, kind)
        os.remove(os.path.join(clean, rel))
    return bad, clean


def stage1(data, store, *extra):
    """Batches of one image: a CPU convolution's rounding may depend on what else is in its batch, and
    a folder without the bad files batches its images differently."""
    return run_stage("get_importances_for_classes.py", "--data_dir", data, "--store_dir", store,
                     "--batch_size", 1, "--chunk_size", 8, *S1, *extra)


def arrays(store):
    return {n: np.load(os.path.join(store, FOLDER, n + ".npy")) for n in ARRAYS}


def raw_bytes(store):
    out = {}
    for n in ARRAYS:
        with open(os.path.join(store, FOLDER, n + ".npy"), "rb") as f:
            out[n] = f.read()
    return out


@pytest.fixture(scope="module")
def stores(datasets, tmp_path_factory):
    """Stores of the bad folder with --skip_unreadable (uninterrupted), and of the clean folder."""
    bad, clean = datasets
    base = tmp_path_factory.mktemp("stores")
    skip, ref = str(base / "skip"), str(base / "clean")
    out = stage1(bad, skip, "--skip_unreadable")
    stage1(clean, ref)
    return skip, ref, out.stdout


def test_each_stage_names_the_unreadable_file(datasets, stores, tmp_path):
    bad, _ = datasets
    skip, _, _ = stores
    # stage 1 stops at the first bad training file in ImageFolder order, naming it
    msg = one_line_error(run_inproc("get_importances_for_classes.py", "--data_dir", bad, "--store_dir",
                                    str(tmp_path / "s"), "--batch_size", 4, "--chunk_size", 8, *S1))
    assert "train/class1/img002.jpg" in msg and "--skip_unreadable" in msg
    # the text file and the truncated PNG, each met first in a folder of its own
    for _, rel, kind in BAD[1:3]:
        one = str(tmp_path / kind.replace(" ", "_"))
        make_image_folder(one, train_per_class=6, val_per_class=1, seed=4)
        if rel.endswith(".png"):
            with Image.open(os.path.join(one, rel[:-4] + ".jpg")) as im:
                im.save(os.path.join(one, rel))
            os.remove(os.path.join(one, rel[:-4] + ".jpg"))
        spoil(one, rel, kind)
        msg = one_line_error(run_inproc("get_importances_for_classes.py", "--data_dir", one, "--store_dir",
                                        str(tmp_path / (kind[:4] + "_s")), "--batch_size", 4, *S1))
        assert rel in msg, (kind, msg)
    # stage 4 on a broken val image
    run_stage("disentangle_channel.py", "--data_dir", bad, "--store_dir", skip, *RUNTIME,
              "--channel_disentangle", 3, "--classes_for_concept1", 0, "--classes_for_concept2", 1)
    msg = one_line_error(run_inproc("get_results.py", "--data_dir", bad, "--model_dir", skip, *RUNTIME,
                                    "--channel_of_interest", 3, "--classes_for_concept1", 0,
                                    "--classes_for_concept2", 1, "--get_quantitative", "--out_dir",
                                    str(tmp_path / "out")))
    assert "val/class0/img001.jpg" in msg and "--skip_unreadable" in msg


def test_skipped_rows_equal_a_store_without_the_files(datasets, stores):
    bad, _ = datasets
    skip, ref, stdout = stores
    a, r = arrays(skip), arrays(ref)
    manifest = json.load(open(os.path.join(skip, FOLDER, "manifest.json")))
    bad_train = sorted(rel for split, rel, _ in BAD if split == "train")
    assert sorted(manifest["unreadable"]) == bad_train
    assert "3 unreadable images" in stdout
    invalid = a["predictions"] == -1
    assert invalid.sum() == 3
    valid = ~invalid
    for name in ARRAYS:
        np.testing.assert_array_equal(a[name][valid], r[name], err_msg=name)
        if name != "targets":
            assert not np.any(a[name][invalid] > 0) if name == "predictions" else not np.any(a[name][invalid])
    # the invalid rows keep their labels: rows stay in ImageFolder order
    assert list(a["targets"][invalid]) == [1, 2, 3]


def test_later_stages_count_without_unreadable_rows(datasets, stores, tmp_path):
    bad, clean = datasets
    skip, ref, _ = stores
    common = ["--proportion_attribution_required", 0.05, "--p", 0.5, "--cos_sim_low", -1, "--cos_sim_high", 1]
    outs = {}
    for name, data, store in (("skip", bad, skip), ("clean", clean, ref)):
        out = str(tmp_path / name)
        proc = run_stage("get_cosine_similarities.py", "--data_dir", data, "--store_dir", store, *RUNTIME,
                         *common, "--out_dir", out)
        outs[name] = proc.stdout
        res = os.path.join(store, "results_get_cosine_similarities")
        hist = json.load(open(os.path.join(res, "tests_tiny_models_tiny_resnet_required0.05_histograms.json")))
        outs[name + "_hist"] = (hist["images_per_class"], hist["histogram_class_by_channel"])
        outs[name + "_table"] = open(os.path.join(out, "results_get_cosine_similarities",
                                                  "tests_tiny_models_tiny_resnet_required0.05_p0.5_cossim-1.0to1.0.txt")).read()
    assert "3 unreadable training images" in outs["skip"]
    assert outs["skip_hist"][0] == [6, 5, 5, 5]  # N_y without the unreadable images
    assert outs["skip_hist"] == outs["clean_hist"]
    assert outs["skip_table"] == outs["clean_table"]
    # stage 3: the same ARVs and train-image counts as from the clean store
    infos = {}
    for name, data, store in (("skip", bad, skip), ("clean", clean, ref)):
        run_stage("disentangle_channel.py", "--data_dir", data, "--store_dir", store, *RUNTIME,
                  "--channel_disentangle", 5, "--classes_for_concept1", 0, 1, "--classes_for_concept2", 2, 3)
        infos[name] = json.load(open(os.path.join(
            store, "models_disentangled", "tests_tiny_models_tiny_resnet_channel5_classes1[0, 1]_classes2[2, 3]_info.json")))
    for key in ("train_images_concept1", "train_images_concept2", "arv_concept1", "arv_concept2", "scores", "best_rho"):
        assert infos["skip"][key] == infos["clean"][key], key
    assert infos["skip"]["train_images_concept1"] == 11 and infos["skip"]["train_images_concept2"] == 10
    # stage 4 with --skip_unreadable: the numbers of the clean val split
    sums = {}
    for name, data, store in (("skip", bad, skip), ("clean", clean, ref)):
        out = str(tmp_path / ("s4" + name))
        proc = run_stage("get_results.py", "--data_dir", data, "--model_dir", store, *RUNTIME,
                         "--channel_of_interest", 5, "--classes_for_concept1", 0, 1, "--classes_for_concept2", 2, 3,
                         "--get_quantitative", "--out_dir", out, *(["--skip_unreadable"] if name == "skip" else []))
        s = json.load(open(os.path.join(out, "results_disentanglement",
                                        "tests_tiny_models_tiny_resnet_channel5_classes1[0, 1]_classes2[2, 3]_f_best_unnormalized_summary.json")))
        sums[name] = (s, proc.stdout)
    assert "skipped 1 unreadable val images: val/class0/img001.jpg" in sums["skip"][1]
    assert sums["skip"][0]["unreadable_val_images"] == ["val/class0/img001.jpg"]
    assert sums["skip"][0]["val_images_concept1"] == 5 == sums["clean"][0]["val_images_concept1"]
    for key in ("sep_concept1", "sep_concept2", "quantitative_concept1", "quantitative_concept2"):
        assert sums["skip"][0][key] == sums["clean"][0][key], key


def test_bad_file_met_before_a_resume_gives_the_same_store(datasets, stores, tmp_path):
    bad, _ = datasets
    skip, _, _ = stores
    store = str(tmp_path / "resumed")
    msg = one_line_error(run_inproc("get_importances_for_classes.py", "--data_dir", bad, "--store_dir", store,
                                    "--batch_size", 1, "--chunk_size", 8, *S1))
    assert "train/class1/img002.jpg" in msg
    progress = os.path.join(store, FOLDER, "progress")
    # the finished chunk before the bad file is kept (rows.json: its images' names and labels, hashed)
    assert sorted(os.listdir(progress)) == ["chunk_0000000.npz", "rows.json"]
    proc = stage1(bad, store, "--skip_unreadable")
    assert "1 chunks already done" in proc.stdout
    assert raw_bytes(store) == raw_bytes(skip)
