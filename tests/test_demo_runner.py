"""demo/runner.py: the stage calls both demos make and the names of the files they read back (from
utils/files/names.py), against the names and command lines written out by hand."""
import os

from demo import runner


class Recorder:
    """Stands in for runner.Runner: keeps (key, script, args) instead of running anything."""

    def __init__(self):
        self.calls = []

    def run(self, key, script, args):
        self.calls.append((key, script, [str(a) for a in args]))
        return f"{script} done\n[{{candidates}}]\n"


def test_split_files_are_the_stages_names():
    f = runner.split_files("/o", "/s", "demo_model_shapes_cnn", 3, 0, 8)
    run = "demo_model_shapes_cnn_channel3_classes1[0]_classes2[8]_f_best_unnormalized"
    assert f.run == run
    assert f.checkpoint == f"/s/models_disentangled/{run}.pth"
    assert f.info == "/s/models_disentangled/demo_model_shapes_cnn_channel3_classes1[0]_classes2[8]_info.json"
    assert f.scores == f.info[:-len("_info.json")] + "_scores.png"
    assert f.summary == f"/o/results_disentanglement/{run}_summary.json"
    assert f.feature_vis == f"/o/results_disentanglement/{run}_feature_vis.json"
    assert f.sae_view == f"/o/results_disentanglement/{run}_sae_view.json"
    assert f.latest_plots == {"density_concept1": "/o/plots/density_concept1.png",
                              "density_concept2": "/o/plots/density_concept2.png",
                              "top_images": "/o/plots/top_images.png"}
    assert f.own_plots == {k: f"/o/plots/{run}_{k}.png" for k in ("density_concept1", "density_concept2", "top_images")}


def test_stages_command_lines_and_candidates_file():
    r = Recorder()
    common = ["--data_dir", "D", "--model", "demo.model:shapes_cnn"]
    s = runner.Stages(r, common, "/s", "/o", "demo.model:shapes_cnn")
    s.stage1()
    s.stage2(0.1, 0.75, 0.0, 0.8)
    s.stage3("stage3", 2, 1, 5)
    s.stage4("stage4", 2, 1, 5, 8, 0.03, ["--get_feature_vis"])
    s.label_free("2,3", 100)
    pair = ["--classes_for_concept1", "1", "--classes_for_concept2", "5"]
    assert r.calls == [
        ("stage1", "get_importances_for_classes.py", common + ["--store_dir", "/s"]),
        ("stage2", "get_cosine_similarities.py", common + [
            "--store_dir", "/s", "--proportion_attribution_required", "0.1", "--p", "0.75", "--cos_sim_low", "0.0",
            "--cos_sim_high", "0.8", "--out_dir", "/o"]),
        ("stage3", "disentangle_channel.py", common + ["--store_dir", "/s", "--channel_disentangle", "2"] + pair),
        ("stage4", "get_results.py", common + ["--model_dir", "/s", "--channel_of_interest", "2"] + pair + [
            "--get_qualitative", "--get_quantitative", "--get_top_images", "--top_k", "8",
            "--proportion_attribution_required", "0.03", "--out_dir", "/o", "--get_feature_vis"]),
        ("stage2_label_free", "get_cosine_similarities.py", common + [
            "--store_dir", "/s", "--label_free", "--channels", "2,3", "--top_n", "100"])]
    assert s.candidates(0.1, 0.75, 0.0, 1.0) == os.path.join(
        "/s", "results_get_cosine_similarities", "demo_model_shapes_cnn_required0.1_p0.75_cossim0.0to1.0_candidates.json")
    assert s.concepts(100) == "/s/results_get_cosine_similarities/demo_model_shapes_cnn_concepts_top100.json"
    assert runner.short(r.run("k", "x.py", []), 8) == "  x.py done"  # the candidate list is left out


def test_clean_removes_only_what_the_demo_makes(tmp_path):
    for name in ("logs", "keep"):
        (tmp_path / name).mkdir()
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("x")
    runner.clean(str(tmp_path), ("logs", "report.json", "absent"))
    assert sorted(os.listdir(tmp_path)) == ["keep", "mine.txt"]
