"""utils.api: keywords to flags through the scripts' own parsers, one-line errors, the files a call wrote and
the records among them. (tests/test_api_walkthrough.py runs docs/python.md against the scripts.)"""
import json
import os

import pytest

from tests.conftest import make_image_folder
from utils import api
from utils.files import atomic, names
from utils.errors import UserError

import disentangle_channel
import get_cosine_similarities

TINY = dict(model="tests.tiny_models:tiny_resnet", batch_size=4, num_workers=0, device="cpu")


def test_keywords_give_the_namespace_of_the_command_line():
    _, args, argv = api.parse("cosine_similarities", store_dir="s", proportion_attribution_required=0.1, p=0.5,
                              cos_sim_low=-0.25, label_free=True, channels=[3, "7"], top_n=None,
                              mean=(0.5, 0.5, 0.5))
    by_hand = get_cosine_similarities.build_parser().parse_args(
        ["--store_dir", "s", "--proportion_attribution_required", "0.1", "--p", "0.5", "--cos_sim_low", "-0.25",
         "--label_free", "--channels", "3", "7", "--mean", "0.5", "0.5", "0.5"])
    assert vars(args) == vars(by_hand)
    assert args.cos_sim_low == -0.25 and args.channels == ["3", "7"] and args.top_n == by_hand.top_n
    assert "--label_free" in argv and "--cos_sim_low=-0.25" in argv


def test_one_value_for_a_list_flag_an_alias_and_a_false_switch():
    _, args, argv = api.parse("disentangle", store_dir="s", channel_of_interest=4, classes_for_concept1=2,
                              classes_for_concept2=[5, 6], export_model=False)
    by_hand = disentangle_channel.build_parser().parse_args(
        ["--store_dir", "s", "--channel_disentangle", "4", "--classes_for_concept1", "2",
         "--classes_for_concept2", "5", "6"])
    assert vars(args) == vars(by_hand)
    assert args.channel_disentangle == 4 and not args.export_model and "--export_model" not in argv


@pytest.mark.parametrize("kwargs, says", [
    (dict(chanel_disentangle=1), "no keyword 'chanel_disentangle' (the keywords are disentangle_channel.py's "
                                 "flags); did you mean channel_disentangle?"),
    (dict(zzz=1), "api.flags('disentangle') lists them"),
    (dict(channel_disentangle=1, channel_of_interest=2), "channel_disentangle= and channel_of_interest= are the "
                                                         "same flag"),
    (dict(export_model="yes"), "export_model='yes': a switch takes True or False"),
    (dict(store_dir=["a", "b"]), "store_dir=['a', 'b']: the flag takes one value"),
    (dict(channel_disentangle="x"), "invalid int value: 'x'"),
    (dict(rho_score="best"), "invalid choice: 'best'"),
])
def test_bad_keywords_are_one_line_user_errors(kwargs, says):
    with pytest.raises(UserError) as e:
        api.disentangle(**kwargs)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_stages_own_refusals_are_user_errors_not_exits():
    with pytest.raises(UserError, match="--data_dir is required"):
        api.importances(store_dir="nowhere")
    with pytest.raises(UserError, match="required: --results, --store, --atlas"):
        api.atlas()
    with pytest.raises(UserError, match="no stage 'stage5'"):
        api.run("stage5")


def test_flags_lists_every_keyword_with_its_help():
    f = api.flags("results")
    assert f["channel_of_interest"] and f["channel_disentangle"] == f["channel_of_interest"]
    assert "help" not in f and "get_feature_vis" in f


def test_written_is_what_is_new_or_replaced(tmp_path):
    folder = str(tmp_path)
    for name in ("kept.json", "replaced.json", ".hidden"):
        atomic.write_text(os.path.join(folder, name), "old")
    before = api.snapshot([folder, os.path.join(folder, "missing")])
    atomic.write_text(os.path.join(folder, "replaced.json"), "old")  # the same bytes, a new file
    atomic.write_text(os.path.join(folder, "sub", "new.txt"), "x")
    atomic.write_text(os.path.join(folder, ".hidden"), "new")
    after = api.snapshot([folder])
    assert api.written(before, after) == (os.path.join(folder, "replaced.json"),
                                          os.path.join(folder, "sub", "new.txt"))


def test_record_kinds_of_the_names_the_stages_write():
    ckpt = names.class_checkpoint("m_conv2", 3, [[1], [2]], names.BEST)
    cases = {
        names.manifest(names.store_folder("S", "m")): "manifest",
        names.candidates_json("S", names.candidates_base("m", 0.05, 0.75, 0.0, 1.0)): "candidates",
        names.concepts_file("S", "m", 100): "concepts",
        names.info_file(os.path.join("S", ckpt)): "info",
        names.summary("O", names.run_name(ckpt)): "summary",
        names.summary("O", names.cluster_checkpoint("m_concepts_top1", 3, 100, [0, 1], 0.5)): "summary",
        names.atlas_record("A"): "atlas",
        names.histograms("S", "m", 0.05): None,
        names.registry("O", "", 0.03): None,
        names.feature_vis_files("O", "run", "")["record"]: None,
        names.atlas_run("A", "channel3", "summary.json"): None,
    }
    assert {p: api.record_kind(p) for p in cases} == cases
    assert ckpt.endswith(api.BEST_CHECKPOINT)


def test_the_stages_return_their_files_and_records(tmp_path):
    data, store, out = (str(tmp_path / d) for d in ("data", "store", "out"))
    make_image_folder(data, train_per_class=3, val_per_class=1, size=(24, 24))
    r0 = api.importances(store_dir=store, list_layers=True, **TINY)
    assert r0.value == 0 and r0.files == ()
    r1 = api.importances(data_dir=data, store_dir=store, crop=32, resize=32, **TINY)
    folder = names.store_folder(store, "tests_tiny_models_tiny_resnet")
    lock = os.path.basename(names.store_lock(folder))
    assert set(r1.files) == {os.path.join(folder, f) for f in os.listdir(folder) if f != lock}
    assert r1.manifest == atomic.read_json(names.manifest(folder))
    assert r1.command[:2] == ("python", "get_importances_for_classes.py") and "--crop=32" in r1.command
    assert api.importances(data_dir=data, store_dir=store, crop=32, resize=32, **TINY).files == ()  # done before

    r2 = api.cosine_similarities(store_dir=store, out_dir=out, p=0.5, **TINY)
    base = names.candidates_base("tests_tiny_models_tiny_resnet", 0.05, 0.5, 0.0, 1.0)
    expected = [names.candidates_table(out, base), names.candidates_json(store, base),
                names.histograms(store, "tests_tiny_models_tiny_resnet", 0.05),
                names.histograms(store, "tests_tiny_models_tiny_resnet", 0.05, ext="npy")]
    assert set(r2.files) == set(expected)
    assert r2.candidates_file == expected[1]
    with open(expected[1]) as f:
        assert r2.candidates == json.load(f)["candidates"]
    assert list(r2.records) == [expected[1]]
    with pytest.raises(ValueError, match="wrote no summary record"):
        r2.summary
    with pytest.raises(Exception):
        r2.files = ()  # frozen

    # stages 3 and 4 with every extra (caches in the store included): the calls list every file there is
    c = r2.candidates[0]
    pair = dict(classes_for_concept1=c["class1"], classes_for_concept2=c["class2"])
    r3 = api.disentangle(store_dir=store, channel_disentangle=c["channel"], export_model=True, **pair, **TINY)
    assert r3.best_checkpoint.startswith(names.checkpoints_dir(store)) and r3.info["channel"] == c["channel"]
    r4 = api.results(model_dir=store, out_dir=out, channel_of_interest=c["channel"], atlas=str(tmp_path / "atlas"),
                     get_qualitative=True, get_quantitative=True, get_top_images=True, top_k=2,
                     get_feature_vis=True, fv_size=32, fv_steps=2, fv_crops=1, fv_spectrum_images=4,
                     get_sae_view=True, sae_expansion=2, sae_k=2, sae_steps=5, sae_positions_per_image=2,
                     **pair, **TINY)
    assert r4.summary["channel"] == c["channel"] and [row["channel"] for row in r4.atlas["rows"]] == [c["channel"]]
    every = {os.path.join(d, f) for top in (store, out, str(tmp_path / "atlas")) for d, _, fs in os.walk(top)
             for f in fs if not f.startswith(".")}
    listed = set(r1.files + r2.files + r3.files + r4.files)
    assert listed == every
    assert any("feature_vis_spectra" in p for p in r4.files) and any("/sae/" in p for p in r4.files)


def test_a_result_shows_in_one_line():
    r = api.Result(stage="results", command=("python", "get_results.py"), files=("/o/a_summary.json", "/o/b.png"),
                   records={"/o/a_summary.json": {"sep_concept1": 2.0}})
    assert repr(r) == "<api.Result results: 2 file(s) written; records: summary>"
    assert r.summary == {"sep_concept1": 2.0} and r.summaries == [r.summary]
