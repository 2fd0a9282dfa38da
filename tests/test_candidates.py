"""--candidates: many channels of a layer in one run of stages 3 and 4, resumable, the whole-layer export, the atlas.

The case: the tiny ResNet on a generated ImageFolder, stages 1 and 2 run once; the candidates file is stage 2's
own, its list replaced by hand-built pairs whose selection is known (channel 3's lowest cosine 0.1 with classes
0 and 1, channel 0's 0.2 with classes 1 and 2, then channel 5's 0.3).
"""
import json
import os
import shutil

import pytest
import torch

import disentangle_channel
import get_results
from tests.conftest import make_image_folder, tree_bytes
from utils.concepts import candidates
from utils.files import names
from utils.run import cli
from utils.errors import UserError

TINY = "tests.tiny_models:tiny_resnet"
MODEL = ["--model", TINY, "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
NAME = "tests_tiny_models_tiny_resnet"
PAIRS = [  # (channel, class1, class2, cosine): channel 3 strongest, then channel 0 (classes 1 and 2), then 5
    (0, 0, 1, 0.5), (0, 0, 2, 0.6), (0, 1, 2, 0.2), (3, 0, 1, 0.1), (3, 1, 2, 0.9), (5, 2, 3, 0.3)]
SELECTED = [(3, "0", "1"), (0, "1", "2")]  # --top 2
STAGE4 = ["--get_qualitative", "--get_quantitative", "--get_top_images", "--top_k", "3",
          "--proportion_attribution_required", "0.0"]


def call(module, args):
    """A stage script's main in this process, as its command line runs it: the exit status (0, or 2)."""
    try:
        cli.run(lambda: module.main(module.build_parser().parse_args([str(a) for a in args])))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """data, store (stage 1 and 2 run), the hand-built candidates file, and the stage flags."""
    work = str(tmp_path_factory.mktemp("candidates"))
    data, store = make_image_folder(os.path.join(work, "data"), 6, 4), os.path.join(work, "store")
    s1 = ["--data_dir", data, "--store_dir", store, *MODEL]
    import get_cosine_similarities
    import get_importances_for_classes
    assert call(get_importances_for_classes, s1) == 0
    assert call(get_cosine_similarities, [*s1, "--out_dir", work, "--p", "0.5"]) == 0
    [found] = [f for f in os.listdir(names.stage2_dir(store)) if f.endswith("_candidates.json")]
    doc = json.load(open(os.path.join(names.stage2_dir(store), found)))
    doc["candidates"] = [dict(channel=c, class1=a, class2=b, cosine_similarity=v) for c, a, b, v in PAIRS]
    path = os.path.join(work, "picked_candidates.json")
    json.dump(doc, open(path, "w"))
    return dict(work=work, data=data, store=store, file=path, s3=s1,
                s4=["--data_dir", data, "--model_dir", store, *MODEL, "--out_dir", os.path.join(work, "out")])


def clean(case):
    for d in (names.checkpoints_dir(case["store"]), os.path.join(case["work"], "out"),
              os.path.join(case["work"], "atlas")):
        shutil.rmtree(d, ignore_errors=True)


def snapshot(case, what):
    return tree_bytes(names.checkpoints_dir(case["store"]) if what == 3 else os.path.join(case["work"], "out"))


def test_selection_lowest_cosine_first_each_channel_once():
    cands = [dict(channel=c, class1=a, class2=b, cosine_similarity=v) for c, a, b, v in PAIRS]
    picked = candidates.strongest_channels(cands, 2, "F")
    assert [(c, ps[0]["class1"], ps[0]["class2"]) for c, ps in picked] == [(3, 0, 1), (0, 1, 2)]
    t = candidates.class_concepts(0, picked[1][1], True, "F channel 0")
    assert t.concepts == [[0], [1], [2]] and t.where == "F channel 0"
    many = [dict(channel=7, class1=y, class2=y + 1, cosine_similarity=0.1 * y) for y in range(6)]  # 7 classes
    with pytest.raises(UserError, match="7 concepts"):
        candidates.class_concepts(7, many, True, "F channel 7")
    with pytest.raises(UserError, match="--top 4: F lists 3 channels"):
        candidates.strongest_channels(cands, 4, "F")


@pytest.mark.slow
def test_candidates_equal_one_run_per_channel_and_resume(case, capsys):
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2"]) == 0
    assert call(get_results, [*case["s4"], "--candidates", case["file"], "--top", "2", *STAGE4,
                              "--atlas", os.path.join(case["work"], "atlas")]) == 0
    many3, many4 = snapshot(case, 3), snapshot(case, 4)
    atlas = json.load(open(names.atlas_record(os.path.join(case["work"], "atlas"))))
    assert len(many3) == 2 * 23 and len(atlas["rows"]) == 2
    assert sum(f.endswith("_summary.json") for f in many4) == 2 and len(many4) > 10
    clean(case)
    for c, a, b in SELECTED:
        pair = ["--classes_for_concept1", a, "--classes_for_concept2", b]
        assert call(disentangle_channel, [*case["s3"], "--channel_disentangle", c, *pair]) == 0
        assert call(get_results, [*case["s4"], "--channel_of_interest", c, *pair, *STAGE4]) == 0
    assert snapshot(case, 3) == many3
    assert snapshot(case, 4) == many4
    # resume: --top 1 first, then --top 2 skips channel 3 (its files untouched) and ends with the same files
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "1"]) == 0
    first = os.path.join(names.checkpoints_dir(case["store"]), names.class_checkpoint(NAME, 3, [[0], [1]], "best"))
    mtime = os.stat(first).st_mtime_ns
    os.remove(names.scores_plot(os.path.join(names.checkpoints_dir(case["store"]),
                                             names.class_checkpoint(NAME, 3, [[0], [1]], 0.1))))
    capsys.readouterr()
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "1"]) == 0  # incomplete
    assert os.stat(first).st_mtime_ns != mtime and snapshot(case, 3).keys() <= many3.keys()
    mtime = os.stat(first).st_mtime_ns
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "channel 3 [0] vs [1]: its files are complete" in out and "channel 0 [1] vs [2]: its" not in out
    assert os.stat(first).st_mtime_ns == mtime
    assert snapshot(case, 3) == many3
    # interrupted: chunks of one job, Ctrl-C once the first is written; the rerun resumes and ends the same
    clean(case)
    from utils.stages import stage3
    real, chunks = stage3.split_and_write, []

    def interrupted(*a):
        if chunks:
            raise KeyboardInterrupt
        chunks.append(real(*a))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage3, "CHUNK", 1)
        mp.setattr(stage3, "split_and_write", interrupted)
        assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2"]) == 130
    assert 0 < len(snapshot(case, 3)) < len(many3)
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2"]) == 0
    assert snapshot(case, 3) == many3


def test_whole_layer_export_equals_original_and_loader(case, capsys):
    from utils.disentangle import load_disentangled_model
    from utils.model import loading
    from utils.model.whole_layer import load_exported_whole_layer
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2", "--export_model"]) == 0
    assert "exported the whole-layer network of 2 channels" in capsys.readouterr().out
    pth, js = names.whole_layer_model(case["store"], NAME, "top2")
    folder = names.checkpoints_dir(case["store"])
    best = {c: os.path.join(folder, names.class_checkpoint(NAME, c, [[int(a)], [int(b)]], "best"))
            for c, a, b in SELECTED}
    assert sorted(json.load(open(js))["channels"]) == ["0", "3"]
    torch.manual_seed(0)
    x = torch.rand(5, 3, 48, 40)
    original, _ = loading.load_model(TINY, None)
    with torch.no_grad():
        z = original.eval()(x)
        z_export = load_exported_whole_layer(js, model=TINY)(x)
        z_loader = load_disentangled_model(TINY, None, "last_conv", checkpoint=best)(x)
    assert (z_export - z).abs().max() <= 1e-4 * z.abs().max()
    assert torch.equal(z_export, z_loader)
    # the file's own rebuild line, run where the file is, gives the same network (it names the factory: a file's
    # model factory is imported only when the caller names it)
    rebuild, here = json.load(open(js))["rebuild"], os.getcwd()
    assert f"model={TINY!r}" in rebuild
    try:
        os.chdir(os.path.dirname(js))
        space = {}
        exec(rebuild, space)
    finally:
        os.chdir(here)
    with torch.no_grad():
        assert torch.equal(space["net"](x), z_export)


def test_all_classes_gives_k_way_checkpoints(case):
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "2", "--all_classes"]) == 0
    files = set(os.listdir(names.checkpoints_dir(case["store"])))
    assert names.class_checkpoint(NAME, 3, [[0], [1], [2]], "best") in files  # classes 0, 1, 2 of channel 3
    assert names.class_checkpoint(NAME, 0, [[0], [1], [2]], "best") in files
    info = json.load(open(names.info_file(os.path.join(names.checkpoints_dir(case["store"]),
                                                       names.class_checkpoint(NAME, 3, [[0], [1], [2]], "best")))))
    assert [info["classes1"], info["classes2"], info["classes3"]] == [[0], [1], [2]]


def bad(case, tmp_name, edit):
    path = os.path.join(case["work"], tmp_name)
    doc = json.load(open(case["file"]))
    edit(doc)
    json.dump(doc, open(path, "w"))
    return path


@pytest.mark.parametrize("what", ["other_store", "top_too_large", "with_triples", "atlas_not_empty",
                                  "all_classes_alone"])
def test_bad_input_one_line_nothing_changed(case, capsys, what):
    if not os.path.isdir(names.checkpoints_dir(case["store"])):
        assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "1"]) == 0
    atlas = os.path.join(case["work"], "not_an_atlas")
    os.makedirs(atlas, exist_ok=True)
    open(os.path.join(atlas, "notes.txt"), "w").write("mine")
    args = {
        "other_store": (disentangle_channel, [*case["s3"], "--candidates",
                                              bad(case, "other.json", lambda d: d.update(layer="conv2"))],
                        "was made from another store: layer differ"),
        "top_too_large": (disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "40"],
                          f"--top 40: {case['file']} lists 3 channels"),
        "with_triples": (get_results, [*case["s4"], "--candidates", case["file"], "--triples", case["file"]],
                         "--candidates gives the channels and concepts: drop --triples"),
        "atlas_not_empty": (get_results, [*case["s4"], "--candidates", case["file"], "--top", "1", "--atlas", atlas],
                            "which no atlas wrote"),
        "all_classes_alone": (disentangle_channel, [*case["s3"], "--channel_disentangle", "0", "--all_classes"],
                              "--all_classes goes with --candidates"),
    }[what]
    before = tree_bytes(case["work"])
    capsys.readouterr()
    assert call(args[0], args[1]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and args[2] in err, err
    assert tree_bytes(case["work"]) == before


def test_concepts_file_highest_silhouette_all_clusters(case):
    import get_cosine_similarities
    assert call(get_cosine_similarities, [*case["s3"], "--label_free", "--channels", "0", "1", "--top_n", "8",
                                          "--k", "2"]) == 0
    path = names.concepts_file(case["store"], NAME, 8)
    doc = json.load(open(path))
    sil = {int(c): e["silhouette"] for c, e in doc["channels"].items() if len(e.get("clusters") or []) >= 2}
    strongest = min(sil, key=lambda c: (-sil[c], c))
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", path, "--top", "1"]) == 0
    k = len(doc["channels"][str(strongest)]["clusters"])
    assert os.listdir(names.checkpoints_dir(case["store"])).count(
        names.cluster_checkpoint(NAME, strongest, 8, list(range(k)), "best")) == 1


@pytest.mark.slow
def test_concepts_file_stage4_one_arv_pass_equals_one_run_per_channel(case, monkeypatch):
    """Stage 4 of several channels' clusters: the val ARVs of all of them from one pass over the val split, and
    the files of one --concepts_file run per channel, byte for byte."""
    import get_cosine_similarities
    from utils.data import scan
    assert call(get_cosine_similarities, [*case["s3"], "--label_free", "--channels", "0", "1", "3", "--top_n", "8",
                                          "--k", "2"]) == 0
    path = names.concepts_file(case["store"], NAME, 8)
    doc = json.load(open(path))
    sil = {int(c): e["silhouette"] for c, e in doc["channels"].items() if len(e.get("clusters") or []) >= 2}
    split = sorted(sil, key=lambda c: (-sil[c], c))  # the selection's order: the last run writes the latest files
    assert len(split) >= 2, doc["channels"]
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", path]) == 0
    passes, real = [], scan.scan

    def counted(*a, **kw):
        passes.append(kw.get("desc"))
        return real(*a, **kw)
    monkeypatch.setattr(scan, "scan", counted)
    assert call(get_results, [*case["s4"], "--candidates", path, *STAGE4]) == 0
    assert passes.count("val ARVs") == 1
    many = snapshot(case, 4)
    assert sum(f.endswith("_summary.json") for f in many) == len(split)
    shutil.rmtree(os.path.join(case["work"], "out"))
    passes.clear()
    for c in split:
        assert call(get_results, [*case["s4"], "--channel_of_interest", c, "--concepts_file", path, *STAGE4]) == 0
    assert passes.count("val ARVs") == len(split)
    assert snapshot(case, 4) == many
    # a memory bound of one channel's ARVs: one pass per channel, the same files
    from utils.stages import stage4_passes
    monkeypatch.setattr(stage4_passes, "ARV_BYTES", 1)
    shutil.rmtree(os.path.join(case["work"], "out"))
    passes.clear()
    assert call(get_results, [*case["s4"], "--candidates", path, *STAGE4]) == 0
    assert passes.count("val ARVs") == len(split) and snapshot(case, 4) == many


# ---------------------------------------------------------------------------------------------- nothing read trusted
def strict_json_files(*roots):
    """{path: value} of every .json below ``roots``, each parsed by a strict parser (no NaN or Infinity tokens)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    out = {}
    for root in roots:
        for d, _, fs in os.walk(root):
            for f in fs:
                if f.endswith(".json"):
                    with open(os.path.join(d, f)) as fh:
                        out[os.path.join(d, f)] = json.loads(fh.read(), parse_constant=refuse)
    return out


def test_every_json_is_strict_and_damaged_checkpoints_are_redone_or_refused(case, capsys):
    """tau = 1: no val image passes, so stage 4's column means are undefined (null, with a reason) in strict JSON;
    a 0-byte checkpoint makes the job run again; a best checkpoint replaced by another rho's is refused."""
    clean(case)
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "1"]) == 0
    s4 = [*case["s4"], "--candidates", case["file"], "--top", "1", "--get_quantitative",
          "--proportion_attribution_required", "1.0"]
    assert call(get_results, [*s4, "--atlas", os.path.join(case["work"], "atlas")]) == 0
    found = strict_json_files(case["store"], case["work"])
    [summary] = [v for p, v in found.items() if p.endswith("_summary.json")]
    q = summary["quantitative_concept1"]
    assert q["images"] == 0 and q["D1/orig"] is None
    assert "the means are undefined" in summary["quantitative_concept1_reason"]
    assert any(p.endswith("manifest.json") for p in found) and any(p.endswith("atlas.json") for p in found)
    folder = names.checkpoints_dir(case["store"])
    best = os.path.join(folder, names.class_checkpoint(NAME, 3, [[0], [1]], "best"))
    info = json.load(open(names.info_file(best)))
    assert set(info["checkpoint_sha256"]) == {n for n in os.listdir(folder) if n.endswith(".pth")}
    # a 0-byte checkpoint of a finished channel: the rerun does the job again instead of skipping it
    some = os.path.join(folder, names.class_checkpoint(NAME, 3, [[0], [1]], 0.4))
    good = open(some, "rb").read()
    open(some, "wb").close()
    capsys.readouterr()
    assert call(disentangle_channel, [*case["s3"], "--candidates", case["file"], "--top", "1"]) == 0
    assert "its files are complete" not in capsys.readouterr().out and open(some, "rb").read() == good
    # the best checkpoint replaced by another rho's: stage 4 refuses it in one line
    other = names.class_checkpoint(NAME, 3, [[0], [1]], 0.1 if info["best_rho"] != 0.1 else 0.2)
    saved = open(best, "rb").read()
    open(best, "wb").write(open(os.path.join(folder, other), "rb").read())
    assert call(get_results, [*case["s4"], "--channel_of_interest", 3, *PAIR_3]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the checkpoint stage 3 wrote" in err and best in err, err
    # ... also when its info file is from before the sha256 were recorded: compared with the best rho's checkpoint
    info_old = {k: v for k, v in info.items() if k != "checkpoint_sha256"}
    json.dump(info_old, open(names.info_file(best), "w"), indent=1)
    assert call(get_results, [*case["s4"], "--channel_of_interest", 3, *PAIR_3]) == 2
    assert f"is not the checkpoint at the best rho {info['best_rho']}" in capsys.readouterr().err
    open(best, "wb").write(saved)


PAIR_3 = ["--classes_for_concept1", "0", "--classes_for_concept2", "1"]


def test_a_full_disk_in_stage_3_is_one_line(case, capsys, monkeypatch):
    clean(case)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 0 vs 64\n"
                           "basic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert call(disentangle_channel, [*case["s3"], "--channel_disentangle", 3, *PAIR_3]) == 2
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(err) == 1 and err[0].startswith("error: no space left on device writing "), err
    err = err[0]
    assert "free space and rerun: finished work is kept" in err
    assert [f for f in os.listdir(names.checkpoints_dir(case["store"])) if f.startswith(".tmp_")] == []


def overflowing():
    """The tiny ResNet with its stem scaled by 1e20: finite weights, attributions beyond float16's range."""
    from tests.tiny_models import tiny_resnet
    model = tiny_resnet()
    with torch.no_grad():
        model.stem[0].weight.mul_(1e20)
    return model


def test_stage_1_refuses_nonfinite_attributions_and_leaves_the_store_incomplete(case, tmp_path, capsys):
    import get_importances_for_classes
    data = make_image_folder(str(tmp_path / "data"), 2, 1, num_classes=4)
    store = str(tmp_path / "store")
    capsys.readouterr()
    assert call(get_importances_for_classes, ["--data_dir", data, "--store_dir", store, "--model",
                                              "tests.test_candidates:overflowing", "--batch_size", "4",
                                              "--num_workers", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the attributions of training images 0..3 hold" in err and "not finite" in err, err
    [folder] = os.listdir(store)
    assert json.load(open(os.path.join(store, folder, "manifest.json")))["complete"] is False
