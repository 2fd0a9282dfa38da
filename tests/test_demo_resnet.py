"""The demo in the paper's layout (``demo/run_demo.py --arch resnet``) at reduced size, one seed.

The layer is a bottleneck block's last 1x1 conv, followed by a BatchNorm, the residual add and ReLU. Checked:
the report has the default demo's keys (and 'arch'), the disentangled network computes the same logits,
stage 2's --importance_sign positive_activation runs on its store and reports what it changes, and the
robust best-rho choice (--rho_score robust) separates both concepts at least twofold each way on the val images.
"""
import json
import os

import pytest

from tests.conftest import run_stage

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out

MODEL = "demo.model:shapes_resnet"
MIN_SEPARATION_ROBUST = 2.0
# the keys that tests/test_demo.py asks of the default demo's report
KEYS = ("channel", "class1", "class2", "best_rho", "quantitative_concept1", "quantitative_concept2", "sep_concept1",
        "sep_concept2", "max_logit_diff", "plots", "seconds", "candidates_head")


def common(out):
    return ["--data_dir", os.path.join(out, "data"), "--model", MODEL, "--weights", os.path.join(out, "model.pth"),
            "--num_workers", 0]


def test_resnet_demo_report_and_same_function(resnet_demo):
    out, rep = resnet_demo
    for key in KEYS + ("arch",):
        assert key in rep, key
    assert rep["arch"] == "resnet" and rep["layer"] == "block.conv3"
    assert rep["logits_unchanged"] is True and rep["max_logit_diff"] <= 1e-4
    with open(rep["info_json"]) as f:
        info = json.load(f)
    assert info["exact"] is True


def test_resnet_demo_positive_activation_report(resnet_demo):
    """Stage 2 with --importance_sign positive_activation on the demo's store finds bn3 and reports counts
    that agree with the published run's histogram."""
    out, rep = resnet_demo
    th = rep["stage2_thresholds"]
    flags = ["--store_dir", os.path.join(out, "store"), "--proportion_attribution_required",
             th["proportion_attribution_required"], "--p", th["p"], "--cos_sim_low", th["cos_sim_low"],
             "--cos_sim_high", th["cos_sim_high"], "--out_dir", out]
    proc = run_stage("get_cosine_similarities.py", *common(out), *flags, "--importance_sign", "positive_activation")
    assert "block.bn3" in proc.stdout
    res = os.path.join(out, "store", "results_get_cosine_similarities")
    tag, tau = "demo_model_shapes_resnet", th["proportion_attribution_required"]
    with open(os.path.join(res, f"{tag}_required{tau}_histograms_positive_activation.json")) as f:
        pos = json.load(f)
    with open(os.path.join(res, f"{tag}_required{tau}_histograms.json")) as f:
        pub = json.load(f)
    s = pos["sign_report"]
    assert s["batchnorm"] == "block.bn3" and s["output_positions"] == 49
    hist = pub["histogram_class_by_channel"]
    n = pub["images_per_class"]
    used = [[c, y] for y in range(len(hist)) for c in range(len(hist[y])) if hist[y][c] >= th["p"] * n[y]]
    assert s["used_pairs_published"] == len(used)
    assert s["important_image_channel_pairs"] == sum(map(sum, hist))
    assert all(p in used for p in s["used_only_through_negative_layer_activation"] + s["dropped_by_positive_activation"])
    assert sum(map(sum, pos["histogram_class_by_channel"])) == s["important_with_positive_activation"]


def test_resnet_demo_robust_rho_separates(resnet_demo, tmp_path):
    out, rep = resnet_demo
    c, y1, y2 = rep["channel"], rep["class1_index"], rep["class2_index"]
    pair = ["--classes_for_concept1", y1, "--classes_for_concept2", y2]
    store = os.path.join(out, "store")
    run_stage("disentangle_channel.py", *common(out), "--store_dir", store, "--channel_disentangle", c, *pair,
              "--rho_score", "robust")
    run_stage("get_results.py", *common(out), "--model_dir", store, "--channel_of_interest", c, *pair,
              "--out_dir", str(tmp_path))
    name = f"demo_model_shapes_resnet_channel{c}_classes1{[y1]}_classes2{[y2]}"
    with open(os.path.join(tmp_path, "results_disentanglement", name + "_f_best_unnormalized_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(store, "models_disentangled", name + "_info.json")) as f:
        info = json.load(f)
    assert info["exact"] is True and info["max_logit_diff"] <= 1e-4
    assert summary["sep_concept1"] >= MIN_SEPARATION_ROBUST, summary
    assert summary["sep_concept2"] >= MIN_SEPARATION_ROBUST, summary
