"""--fv_preset (utils/featurevis/settings.py) and the plan and estimate printed before the feature visualizations
(utils/stages/feature_vis_estimate.py): the presets' values and the flags that win over them, the estimate's
arithmetic with a stand-in timer, and a stage-4 run that records its preset."""
import json
import os

import pytest
import torch

import get_results
from tests.test_featurevis import FV_SMALL, TAG, _stage4_args, red_green_checkpoint, spec_of
from utils.featurevis.settings import PRESETS
from utils.files.names import class_checkpoint
from utils.run import settings_of_flags
from utils.stages import feature_vis_estimate


def settings_of(*flags):
    args = get_results.build_parser().parse_args(["--model_dir", "S", *map(str, flags)])
    return settings_of_flags.feature_vis(args, spec_of(args))


def test_presets_and_the_flags_that_win():
    s = settings_of()
    assert (s.size, s.steps, s.crops, s.spectrum_images, s.preset) == (512, 256, 32, 256, None)
    s = settings_of("--fv_preset", "paper")
    assert (s.size, s.steps, s.crops, s.spectrum_images, s.preset) == (512, 256, 32, 256, "paper")
    s = settings_of("--fv_preset", "quick")
    assert (s.size, s.steps, s.crops, s.spectrum_images, s.preset) == (64, 32, 4, 64, "quick")
    s = settings_of("--fv_preset", "quick", "--fv_steps", 10, "--fv_size", 512)
    assert (s.size, s.steps, s.crops, s.spectrum_images) == (512, 10, 4, 64)
    assert PRESETS["paper"] == {"fv_size": 512, "fv_steps": 256, "fv_crops": 32, "fv_spectrum_images": 256}


class Ctx:
    device, transform = "cpu", type("T", (), {"crop": 224})


@pytest.mark.parametrize("batch_targets,optimizations,factor", [(0, 3, 1 + 1 + 4 / 3), (6, 2, 1 + 4 / 6)])
def test_estimate_is_steps_times_one_timed_step_scaled_by_targets(capsys, batch_targets, optimizations, factor):
    """Jobs of 3, 3 and 4 targets: each alone, or the first two in one optimization of 6 (--fv_batch_targets 6);
    a stand-in timer says 0.5 s per step at the requested size and 0.01 s at the quick one."""
    filters = [(torch.zeros(t, 2, 1, 1), None) for t in (3, 3, 4)]
    timed = []

    def timer(ctx, first, size, crops, batch_size, input_size):
        timed.append((sum(w.shape[0] for w, _ in first), size, crops))
        return 0.5 if size == 512 else 0.01
    s = settings_of("--fv_batch_targets", batch_targets)
    total = feature_vis_estimate.announce(Ctx, s, filters, timed=timer)
    assert total == pytest.approx(256 * 0.5 * factor)
    first = 3 if batch_targets == 0 else 6
    assert timed == [(first, 512, 32), (first, 64, 4)]  # the first optimization, at both sizes
    line = capsys.readouterr().out
    assert f"{optimizations} optimizations of 256 steps x 32 crops at S=512: about " in line
    assert feature_vis_estimate.duration(256 * 0.5 * factor) in line
    assert f"--fv_preset quick (--fv_size 64 --fv_steps 32 --fv_crops 4 --fv_spectrum_images 64) takes about " \
           f"{feature_vis_estimate.duration(32 * 0.01 * factor)}" in line
    timed.clear()  # at the quick sizes or below: no second timing, no advice
    feature_vis_estimate.announce(Ctx, settings_of("--fv_preset", "quick"), filters, timed=timer)
    assert len(timed) == 1 and "--fv_preset quick (" not in capsys.readouterr().out
    assert feature_vis_estimate.duration(42) == "42 s" and feature_vis_estimate.duration(7560) == "2.1 h"


def test_stage4_records_the_preset_and_prints_the_plan(image_root, tmp_path, capsys):
    from tests.test_candidates import call
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    os.makedirs(os.path.join(store, "models_disentangled"))
    run = class_checkpoint(TAG, 0, [[0], [1]], "best")
    torch.save(red_green_checkpoint(), os.path.join(store, "models_disentangled", run))
    assert call(get_results, _stage4_args(image_root, store, out, "--fv_preset", "quick", *FV_SMALL)) == 0
    rec = json.load(open(os.path.join(out, "results_disentanglement", f"{run[:-4]}_feature_vis.json")))
    assert rec["preset"] == "quick" and (rec["size"], rec["steps"], rec["crops"]) == (24, 2, 2)  # the flags win
    assert "feature visualizations: 1 optimization of 2 steps x 2 crops at S=24: about " in capsys.readouterr().out
