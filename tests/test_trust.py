"""Nothing read is trusted: damaged files are one line, checksums tie what is read to what was written, numbers are
finite or refused, separations with a denominator of 0 are unbounded, JSON is strict, data-folder links stay inside,
a full disk is one line. Small generated files; the stage runs live in tests/test_candidates.py (its case)."""
import errno
import hashlib
import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch

from tests.conftest import make_image_folder
from utils.atlas import collect
from utils.data import folders
from utils.files import atomic, digests, reading, registry
from utils.files.store import ARRAYS, Store
from utils.model import loading
from utils import finite
from utils.errors import UserError


def strict_loads(text):
    """json.loads that refuses NaN, Infinity and -Infinity (RFC 8259)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def one_line(exc, path):
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    assert "allow_pickle" not in text and "weights_only=False" not in text, text
    return text


# ---------------------------------------------------------------------------------------------- damaged files
def test_every_damaged_file_is_one_line_naming_it(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    good = tmp_path / "good.npy"
    np.save(good, a)
    assert np.array_equal(reading.open_npy(good, (6, 4), "float32"), a)
    raw = good.read_bytes()
    short = tmp_path / "short.npy"
    short.write_bytes(raw[:-10])  # cut short: numpy's mmap would say "mmap length is greater than file size"
    with pytest.raises(reading.Damaged, match=r"cut short: 214 bytes, its header \(\(6, 4\) float32\) needs 224") as e:
        reading.open_npy(short)
    one_line(e.value, short)
    garbled = tmp_path / "garbled.npy"
    garbled.write_bytes(raw[:10] + b"{'descr': <f4, what" + raw[29:])
    with pytest.raises(reading.Damaged, match="header is garbled") as e:
        reading.open_npy(garbled)
    one_line(e.value, garbled)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(reading.Damaged, match="holds Python objects") as e:
        reading.open_npy(objects)
    one_line(e.value, objects)
    with pytest.raises(reading.Damaged, match=r"holds shape \(6, 4\), not \(7, 4\)"):
        reading.open_npy(good, (7, 4))
    # a truncated JSON file (an info file, a registry, a manifest)
    js = tmp_path / "info.json"
    js.write_text(json.dumps({"best_rho": 0.3, "scores": [1, 2, 3]})[:20])
    with pytest.raises(reading.Damaged, match="not complete JSON") as e:
        atomic.read_json(js, "rerun it")
    assert one_line(e.value, js).endswith("; rerun it") and isinstance(e.value, ValueError)
    # a truncated .npz (a spectrum cache, a progress chunk): BadZipFile to numpy
    npz = tmp_path / "cache.npz"
    atomic.save_npz(npz, {"a": a, "b": a + 1})
    assert np.array_equal(reading.load_npz(npz)["b"], a + 1)
    npz.write_bytes(npz.read_bytes()[:150])
    with pytest.raises(reading.Damaged, match="not a complete .npz archive") as e:
        reading.load_npz(npz)
    one_line(e.value, npz)


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path):
    sd = {"disentangled.weight": torch.ones(3, 2, 1, 1)}
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    assert torch.equal(reading.load_state_dict(good)["disentangled.weight"], sd["disentangled.weight"])
    npy, npz, empty, cut = (tmp_path / n for n in ("a.npy", "a.npz", "empty.pth", "cut.pth"))
    np.save(npy, np.array([1, None], dtype=object), allow_pickle=True)
    np.savez(npz, w=np.ones(3))
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[:200])
    pickled = tmp_path / "obj.pth"
    torch.save({"w": torch.ones(1), "x": zipfile.ZipInfo("x")}, pickled)  # an object a weights-only load refuses
    for path, what in ((npy, "a numpy .npy array"), (npz, "a numpy .npz archive"), (empty, r"empty \(0 bytes\)"),
                       (cut, "cut short or garbled"), (pickled, "holds objects other than tensors")):
        with pytest.raises(reading.Damaged, match=what) as e:
            reading.load_state_dict(path, "checkpoint", "rerun stage 3")
        one_line(e.value, path)
    with pytest.raises(UserError, match=r"--weights .*a.npy: cannot be read as a state dict: a numpy .npy array"):
        loading.load_model("tests.tiny_models:tiny_resnet", str(npy))


def test_a_truncated_registry_is_one_line(tmp_path):
    rows = {1: np.ones((2, 3)), 2: np.zeros((0, 3))}
    registry.update_quantitative(str(tmp_path), "", 0.2, "run_a", rows, {"model": "m"})
    [reg] = [p for p in tmp_path.iterdir() if p.name.startswith("runs_")]
    reg.write_text(reg.read_text()[:-7])
    with pytest.raises(reading.Damaged, match="not complete JSON.*rerun get_results.py --quantitative") as e:
        registry.update_quantitative(str(tmp_path), "", 0.2, "run_b", rows, {"model": "m"})
    one_line(e.value, reg)


def test_a_damaged_spectrum_cache_is_computed_again(tmp_path, capsys):
    from utils.featurevis import spectrum
    data = make_image_folder(str(tmp_path / "data"), train_per_class=2, val_per_class=1, num_classes=2)
    first, path, reused = spectrum.load_or_make_spectrum(str(tmp_path / "store"), data, 16, 4, 4, 0)
    assert not reused and spectrum.load_or_make_spectrum(str(tmp_path / "store"), data, 16, 4, 4, 0)[2]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again, path2, reused = spectrum.load_or_make_spectrum(str(tmp_path / "store"), data, 16, 4, 4, 0)
    assert path2 == path and not reused and torch.equal(again["magnitude"], first["magnitude"])
    assert "a damaged spectrum cache (not a complete .npz archive" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the store's digests
def small_store(folder, n=10):
    """A complete store of ``n`` rows written as stage 1 writes one (create, chunks, merge, finish)."""
    shapes = {"attributions": ((n, 4), np.float16), "targets": ((n,), np.int64), "predictions": ((n,), np.int64),
              "patch_sums": ((n, 3, 2, 2), np.float32)}
    st, status = Store.create_or_resume(folder, {"num_images": n, "chunk_size": n}, shapes)
    assert status == "new"
    rng = np.random.default_rng(0)
    st.save_chunk(0, 0, {"attributions": rng.normal(size=(n, 4)).astype(np.float16),
                         "targets": np.arange(n) % 2, "predictions": np.arange(n) % 2,
                         "patch_sums": rng.normal(size=(n, 3, 2, 2)).astype(np.float32)})
    st.merge_chunks()
    st.finish(1)
    return st


def test_the_store_records_sha256_and_refuses_damaged_arrays(tmp_path):
    folder = str(tmp_path / "m_channel_importances")
    st = small_store(folder)
    for name in ARRAYS:  # the recorded digest is the sha256 of the file's bytes
        rec = st.manifest["digests"][f"{name}.npy"]
        data = open(st.path(name), "rb").read()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
    assert Store.open(folder).manifest["complete"]
    # one byte changed in place (same size): the sha256 differs
    p = st.path("patch_sums")
    data = bytearray(open(p, "rb").read())
    data[-1] ^= 0xFF
    open(p, "wb").write(bytes(data))
    with pytest.raises(reading.Damaged, match="sha256 mismatch.*delete .* and rerun get_importances_for_classes.py"):
        Store.open(folder)
    # a large store checks the sha256 of an array modified after its manifest (this one) ...
    with pytest.raises(reading.Damaged, match="sha256 mismatch"):
        Store(folder, st.manifest).check_arrays(full=False)
    # ... but not of one whose time was set back before the manifest's (the rule's documented limit); every open
    # of a small store checks it all the same
    manifest_ns = os.stat(os.path.join(folder, "manifest.json")).st_mtime_ns
    os.utime(p, ns=(manifest_ns - 10**9, manifest_ns - 10**9))
    Store(folder, st.manifest).check_arrays(full=False)
    with pytest.raises(reading.Damaged):
        Store(folder, st.manifest).check_arrays()
    data[-1] ^= 0xFF
    open(p, "wb").write(bytes(data))
    Store.open(folder)
    # targets.npy cut short: one line before numpy maps it
    t = st.path("targets")
    open(t, "r+b").truncate(os.path.getsize(t) - 8)
    with pytest.raises(reading.Damaged, match="targets.npy: cut short") as e:
        Store.open(folder)
    one_line(e.value, t)


def test_a_store_without_digests_is_still_read(tmp_path):
    folder = str(tmp_path / "m_channel_importances")
    st = small_store(folder)
    manifest = dict(st.manifest)
    del manifest["digests"]
    atomic.write_json(os.path.join(folder, "manifest.json"), manifest)
    assert np.array_equal(Store.open(folder).labels(), np.arange(10) % 2)
    with open(os.path.join(folder, "manifest.json"), "r+") as f:  # a truncated manifest: one line
        f.truncate(100)
    with pytest.raises(reading.Damaged, match="manifest.json: not complete JSON"):
        Store.open(folder)


# ---------------------------------------------------------------------------------------------- strict JSON, finite
def test_json_is_strict_and_says_why_a_number_is_missing(tmp_path):
    obj = {"sep_concept1": float("nan"), "sep_concept2": 2.5, "scores": [1.0, float("inf")],
           "means": {"D1/orig": float("-inf"), "D1/orig_reason": "no image"}, "n": 3}
    path = tmp_path / "x.json"
    atomic.write_json(path, obj)
    got = strict_loads(path.read_text())
    assert got == {"sep_concept1": None, "sep_concept1_reason": "not a finite number (nan)", "sep_concept2": 2.5,
                   "scores": [1.0, None], "means": {"D1/orig": None, "D1/orig_reason": "no image"}, "n": 3}
    finite_only = {"a": [0.1, 1e-300, 3], "b": {"c": "d"}}  # finite values: as json.dumps writes them
    assert atomic.strict_json(finite_only) == json.dumps(finite_only, indent=1)


def test_nonfinite_values_are_refused_with_their_count():
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert finite.nonfinite_count(x) == 2 and finite.nonfinite_count(np.float16([np.inf, 1])) == 1
    with pytest.raises(UserError, match="the maps hold 2 values that are not finite .* of 4; fix it"):
        finite.refuse_nonfinite(x, "the maps", "fix it")
    finite.refuse_nonfinite(torch.arange(3), "labels", "")  # integers are always finite


def test_nonfinite_weights_are_refused_before_any_pass(tmp_path):
    model, _ = loading.load_model("tests.tiny_models:tiny_resnet", "none")
    sd = model.state_dict()
    sd["conv2.weight"][0, 0, 0, :2] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"hold 2 values that are not finite \(NaN or infinity\) in 1 tensors, "
                                        r"first conv2.weight"):
        loading.load_model("tests.tiny_models:tiny_resnet", str(path))


def test_nan_scores_are_one_line_not_an_index_error():
    from types import SimpleNamespace
    from utils.stages import stage3
    job = SimpleNamespace(res=SimpleNamespace(scores=torch.full((20,), float("nan"))),
                          concepts=SimpleNamespace(channel=4, describe=lambda: "classes [0] vs [1]"))
    with pytest.raises(UserError, match="the 20 rho scores of channel 4 classes .* hold 20 values that are not finite"):
        stage3.check_networks(None, None, [job], None)


def test_the_atlas_reads_an_unbounded_separation_as_none():
    new = {"sep_concept1": None, "sep_concept1_reason": "unbounded: mean pos(D2) ... is 0", "sep_concept2": 1.5,
           "mean_pos_concept1": {"D1": 2.0, "D2": 0.0}, "mean_pos_concept2": {"D1": 1.0, "D2": 1.5}}
    assert collect.separations(new, 2) == ([None, 1.5], ["unbounded: mean pos(D2) ... is 0", None])
    old = dict(new, sep_concept1=2.0 / 1e-12)  # written before: the quotient by the 1e-12 floor
    del old["sep_concept1_reason"]
    seps, reasons = collect.separations(old, 2)
    assert seps == [None, 1.5] and reasons[0].startswith("unbounded")


# ---------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    path = tmp_path / "f_best.pth"
    atomic.save_torch(path, {"w": torch.ones(2)})
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                           "basic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(atomic.DiskFull, match=r"^no space left on device writing .*f_best.pth; free space and "
                                              r"rerun: finished work is kept$"):
        atomic.save_torch(path, {"w": torch.zeros(2)})
    monkeypatch.undo()

    with pytest.raises(atomic.DiskFull, match="writing .*x.json"):  # what any writer meets: OSError ENOSPC
        with atomic.atomic_path(tmp_path / "x.json") as tmp:
            open(tmp, "w").write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["f_best.pth"]  # no temporary left


# ---------------------------------------------------------------------------------------------- data folders
def test_data_folder_links_stay_inside_and_loops_are_refused(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=1, num_classes=2)
    train = os.path.join(data, "train")
    assert len(folders.image_folder(data, "train")) == 8
    os.symlink(os.path.join("..", "class1"), os.path.join(train, "class0", "more"))  # inside: followed
    ds = folders.image_folder(data, "train")
    assert len(ds) == 12 and ds.targets.count(0) == 8
    loop = os.path.join(train, "class0", "loop")
    os.symlink(".", loop)  # ImageFolder alone would list class0's images again and again
    with pytest.raises(UserError, match=r"train/class0/loop is a symbolic link to a folder above it \(train/class0\)"):
        folders.image_folder(data, "train")
    os.remove(loop)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(train, "class1", "out"))
    with pytest.raises(UserError, match="train/class1/out is a symbolic link to .*elsewhere, outside the data folder"):
        folders.image_folder(data, "train")
    # the split folder itself may be a link (train -> a big disk): its own folder counts as inside
    os.remove(os.path.join(train, "class1", "out"))
    moved = tmp_path / "disk" / "train"
    os.makedirs(moved.parent)
    os.rename(train, moved)
    os.symlink(str(moved), train)
    assert len(folders.image_folder(data, "train")) == 12


def test_stage_2_refuses_a_store_of_nan_attributions():
    """A store written before stage 1 refused them: one line naming the rows, not "0 candidates"."""
    from utils.stages import stage2_passes
    a = np.ones((6, 3), dtype=np.float16)
    a[4, 1] = np.nan
    with pytest.raises(UserError, match=r"the store's attributions of rows 4\.\.5 hold 1 values that are not finite"):
        stage2_passes.class_histogram(a, np.zeros(6, dtype=np.int64), 1, 0.1, chunk_rows=2)
    P = np.ones((6, 2, 1, 1), dtype=np.float32)
    P[0, 0] = np.inf
    with pytest.raises(UserError, match=r"patch sums of rows 0\.\.1 hold 1 values"):
        stage2_passes.class_mean_patch_sums(P, np.zeros(6, dtype=np.int64), 1, chunk_rows=2)
