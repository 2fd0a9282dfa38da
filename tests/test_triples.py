"""Several triples in one process (``--triples FILE``) for stages 3 and 4: the same files, byte for byte, as
one run per triple; the triples file format; bad input refused in one line before anything is written;
stage 3's exactness checks through the command line."""
import json
import os
import shutil

import pytest

from tests.conftest import tree_bytes
from tests.test_cli import refuse, run_inproc
from utils.concepts import by_classes as trip
from utils.errors import UserError

STAGE1 = "get_importances_for_classes.py"
STAGE3 = "disentangle_channel.py"
STAGE4 = "get_results.py"
TINY = "tests.tiny_models:tiny_resnet"
TAG = "tests_tiny_models_tiny_resnet"
RUNTIME = ["--num_workers", "0", "--device", "cpu"]
# batch 4 with 6 train and 4 val images per class: a class fills one batch and part of the next (train)
MODEL = ["--model", TINY, "--batch_size", 4, *RUNTIME]
# three triples sharing classes, one concept of two classes, a comment and a blank line
TRIPLES_TEXT = "# channel class1 class2\n1 0 1\n\n5 2 3   # a comment\n7 0,2 1\n"
TRIPLES = [(1, [0], [1]), (5, [2], [3]), (7, [0, 2], [1])]


def ok(script, *args, cwd=None):
    proc = run_inproc(script, *args, cwd=cwd)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def flags(t, channel_flag):
    c, s1, s2 = t
    return [channel_flag, c, "--classes_for_concept1", *s1, "--classes_for_concept2", *s2]


@pytest.fixture(scope="module")
def case(image_root, tmp_path_factory):
    """A stage-1 store of the tiny ResNet; stage 3 with --triples into it, and one run per triple into a
    second store holding the same stage-1 arrays."""
    root = tmp_path_factory.mktemp("triples")
    store, store_b = str(root / "store"), str(root / "store_b")
    ok(STAGE1, "--data_dir", image_root, "--store_dir", store, *MODEL)
    os.makedirs(store_b)
    shutil.copytree(os.path.join(store, f"{TAG}_channel_importances"),
                    os.path.join(store_b, f"{TAG}_channel_importances"))
    path = root / "triples.txt"
    path.write_text(TRIPLES_TEXT)
    batched = ok(STAGE3, "--data_dir", image_root, "--store_dir", store, *MODEL, "--triples", path)
    single = [ok(STAGE3, "--data_dir", image_root, "--store_dir", store_b, *MODEL, *flags(t, "--channel_disentangle"))
              for t in TRIPLES]
    return dict(root=root, data=image_root, store=store, store_b=store_b, triples=str(path), batched=batched,
                single=single)


def test_parse_triples_format():
    text = "# header\n522 62 687\n\n 1660  530  938  # headline\n522 61,62 687\n"
    got = trip.parse_triples(text, "t.txt")
    assert [(t.channel, t.classes1, t.classes2) for t in got] == [(522, [62], [687]), (1660, [530], [938]),
                                                                 (522, [61, 62], [687])]
    assert [t.where for t in got] == ["t.txt line 2", "t.txt line 4", "t.txt line 5"]
    assert got[2].classes == [61, 62, 687]
    for bad, *words in (("1 2\n", "line 1", "found 2 fields"), ("1 2 3 4\n", "found 4 fields"),
                        ("x 2 3\n", "channel 'x'"), ("1 2,,3 4\n", "1,2,3"), ("1 2,2 3\n", "twice"),
                        ("1 2 3\n# c\n1 2 3\n", "line 3", "repeats the triple of line 1"),
                        ("# only comments\n\n", "no triple")):
        with pytest.raises(UserError) as e:
            trip.parse_triples(bad, "t.txt")
        for w in words:
            assert w in str(e.value)


def test_class_batches_never_mix_classes():
    assert trip.class_batches([0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 2, 2], 2) == [[0, 1], [2], [3, 4], [5, 6]]
    # the batches of a class do not depend on which other classes are there
    assert trip.class_batches([3, 4, 5], [1, 1, 2], 2) == [[3, 4], [5]]
    assert trip.class_batches([], [], 4) == []


@pytest.mark.slow
def test_stage3_batched_files_equal_one_run_per_triple(case):
    a = tree_bytes(os.path.join(case["store"], "models_disentangled"))
    b = tree_bytes(os.path.join(case["store_b"], "models_disentangled"))
    assert len(a) == 3 * 23  # 20 checkpoints, the best one, info.json and scores.png per triple
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, different  # the scores plots included
    for c, s1, s2 in TRIPLES:
        info = json.loads(a[f"{TAG}_channel{c}_classes1{s1}_classes2{s2}_info.json"])
        assert info["exact"] is True and info["exactness_tolerance_relative"] == 1e-4
        assert info["map_check_images"] == 6 * (len(s1) + len(s2)) and info["logit_check_images"] == 4
        assert info["max_map_diff"] <= 1e-4 * max(1.0, info["max_abs_map"]) and info["max_abs_map"] > 0
        assert info["max_logit_diff"] <= 1e-4 * max(1.0, info["max_abs_logit"])
    out = case["batched"].stdout
    assert out.count("OK, same function") == 3 and out.count("=== ") == 3
    assert f"{case['triples']} line 5: channel 7, classes [0, 2] vs [1]" in out


@pytest.mark.parametrize("extra", [["--get_qualitative", "--get_quantitative", "--get_top_images"],
                                   ["--get_top_images", "--top_images_all_val", "--f", 0.5]],
                         ids=["concept_images", "all_val_rho0.5"])
@pytest.mark.slow
def test_stage4_batched_files_equal_one_run_per_triple_in_order(case, tmp_path, extra):
    common = ["--data_dir", case["data"], "--model_dir", case["store"], *MODEL, "--layer_of_interest", "conv3",
              *extra]
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    ok(STAGE4, *common, "--triples", case["triples"], "--out_dir", out_a)
    for t in TRIPLES:
        ok(STAGE4, *common, *flags(t, "--channel_of_interest"), "--out_dir", out_b)
    # the lock of the quantitative record names the process and time that last held it: not a result
    a, b = ({k: v for k, v in tree_bytes(o).items() if not k.endswith(".lock")} for o in (out_a, out_b))
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert len([n for n in a if n.endswith("_summary.json")]) == 3
    if "--get_quantitative" in extra:  # the read-modify-write record holds the three runs, in file order
        runs = json.loads(a[os.path.join("results_quantitative", "runs_required0.03.json")])
        assert [k.split("_channel")[1].split("_classes")[0] for k in runs] == ["1", "5", "7"]


def _snapshot(case):
    return {d: tree_bytes(d) for d in (case["store"], case["store_b"])}


BAD = {
    # name: (stage, triples file text or None, extra flags, words of the one-line message)
    "missing_file": (3, None, ["--triples", "NOFILE"], ("--triples", "not found")),
    "malformed_line": (3, "1 0 1\n5 2\n", [], ("line 2", "'channel class1 class2'")),
    "not_an_integer": (3, "1 0 one\n", [], ("line 1", "'one'")),
    "bad_channel": (3, "1 0 1\n16 2 3\n", [], ("line 2", "channel 16 is out of range", "16 channels")),
    "bad_class": (3, "1 0 1\n5 2 4\n", [], ("line 2", "class 4 is out of range")),
    "class_in_both": (3, "1 0,1 1\n", [], ("line 1", "class 1 is in both concepts")),
    "repeated_triple": (3, "1 0 1\n5 2 3\n1 0 1\n", [], ("line 3", "repeats the triple of line 1")),
    "file_and_flags": (3, "1 0 1\n", ["--channel_disentangle", 1], ("--triples replaces", "--channel_disentangle")),
    "empty_file": (3, "# nothing here\n\n", [], ("no triple in the file",)),
    "no_triple_at_all": (3, None, [], ("--channel_disentangle", "or --triples")),
    "stage4_bad_channel": (4, "1 0 1\n-1 2 3\n", [], ("line 2", "channel -1 is out of range")),
    "stage4_missing_checkpoint": (4, "1 0 1\n2 0 1\n", [], ("channel2_classes1[0]_classes2[1]", "not found")),
    "stage4_file_and_flags": (4, "1 0 1\n", ["--classes_for_concept2", 3], ("--triples replaces",)),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_triples_refused_in_one_line_before_any_work(case, tmp_path, name):
    stage, text, extra, words = BAD[name]
    args = []
    if text is not None:
        path = tmp_path / "t.txt"
        path.write_text(text)
        args = ["--triples", path]
    args += [str(tmp_path / "missing.txt") if a == "NOFILE" else a for a in extra]
    out = str(tmp_path / "out")
    if stage == 3:
        cmd = [STAGE3, "--data_dir", case["data"], "--store_dir", case["store"], *MODEL, *args]
    else:
        cmd = [STAGE4, "--data_dir", case["data"], "--model_dir", case["store"], *MODEL, "--layer_of_interest",
               "conv3", "--get_qualitative", "--get_quantitative", "--out_dir", out, *args]
    before = _snapshot(case)
    refuse(*cmd, words=words, cwd=str(tmp_path))
    assert run_inproc(*cmd, cwd=str(tmp_path)).returncode == 2
    assert _snapshot(case) == before
    assert not os.path.exists(out)


def test_exactness_failure_writes_nothing(image_root, tmp_path):
    """A model whose layer output is shifted by a hook: both checks fail, one line, exit 2, no file."""
    store = str(tmp_path / "store")
    hooked = ["--model", "tests.tiny_models:tiny_resnet_hooked", "--batch_size", 4, *RUNTIME]
    ok(STAGE1, "--data_dir", image_root, "--store_dir", store, *hooked)
    before = tree_bytes(store)
    cmd = [STAGE3, "--data_dir", image_root, "--store_dir", store, *hooked, "--channel_disentangle", 1,
           "--classes_for_concept1", 0, "--classes_for_concept2", 1, "--exactness_images", 2]
    proc = run_inproc(*cmd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # after the progress bar of the scoring pass
    assert last.startswith("error: ") and [ln for ln in proc.stderr.splitlines() if "error" in ln] == [last]
    for w in ("does not reproduce", "channel 1 [0] vs [1]", "nothing written"):
        assert w in last
    assert "max |D1 + D2 - R - channel 1's map| = 0.5" in proc.stdout  # the hook's shift, seen on every image
    assert "exactness check on the first 2 training images" in proc.stdout and proc.stdout.count("FAILED") == 2
    assert tree_bytes(store) == before
