"""Feature visualizations of several groups of targets in one optimization (``render.visualize_many``) and
stage 4's --fv_batch_targets: each group's images equal those of its own run, up to the float rounding of the
model's batched convolutions."""
import numpy as np
import pytest
import torch

from tests.test_featurevis import natural_spectrum
from tests.tiny_models import TinyResNet
from utils.featurevis import render
from utils.featurevis.param import maco_image, unit_color_matrix
from utils.featurevis.transform import CROP_SCALE, add_noise, crop_boxes, crops_of, normalize
from utils.featurevis.objectives import target_values
from utils.model.tap import layer_input_with_grad

# batched vs alone: the model's convolutions on another batch may round differently (float32); after the few
# steps of these tests the images differ by far less than this share of their [0, 1] range
TOL = 1e-4
SIZE, STEPS, CROPS, INPUT = 32, 3, 2, 48


def _old_visualize(model, conv, weights, bias, magnitude, q, size, steps, crops, seed, lr=1.0, batch_size=None,
                   input_size=224, scale=CROP_SCALE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The single-group loop as it was before ``visualize_many`` (CPU): the reference of bit identity."""
    t_count = weights.shape[0]
    targets = (weights.float(), None if bias is None else bias.float())
    m = magnitude.float()
    qu = unit_color_matrix(q.double()).float()
    gen = torch.Generator().manual_seed(int(seed))
    phase = torch.randn((t_count,) + tuple(m.shape), generator=gen).requires_grad_(True)
    opt = torch.optim.NAdam([phase], lr=lr)
    transparency = torch.zeros((t_count, 3, size, size))
    chunk = t_count * crops if not batch_size else batch_size
    for _ in range(steps):
        opt.zero_grad()
        img = maco_image(m, phase, qu)
        leaf = img.detach().requires_grad_(True)
        boxes = crop_boxes(t_count, crops, size, gen, scale)
        for lo in range(0, len(boxes), chunk):
            bx = boxes[lo:lo + chunk]
            x = layer_input_with_grad(model, conv, normalize(add_noise(crops_of(leaf, bx, input_size), gen), mean, std))
            own = target_values(x.float(), conv, *targets).gather(1, bx[:, :1].long()).flatten()
            (-own.sum() / crops).backward()
        transparency += leaf.grad.abs()
        img.backward(leaf.grad)
        opt.step()
    with torch.no_grad():
        return maco_image(m, phase, qu), transparency


def _setup():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    conv = model.conv2
    g = torch.Generator().manual_seed(3)
    groups = [(torch.randn(t, *conv.weight.shape[1:], generator=g), None, seed)
              for t, seed in ((3, 0), (2, 5), (1, 7))]
    return model, conv, groups, natural_spectrum(SIZE)


def _many(model, conv, groups, spec, batch_size=None):
    return render.visualize_many(render.ModelInput(model, conv, INPUT), groups,
                                 render.Maco(*spec, SIZE, STEPS, CROPS, batch_size=batch_size, progress=False))


def _alone(model, conv, group, spec, batch_size=None):
    w, b, seed = group
    return render.visualize(render.ModelInput(model, conv, INPUT), w, b, seed,
                            render.Maco(*spec, SIZE, STEPS, CROPS, batch_size=batch_size, progress=False))


@pytest.mark.parametrize("batch_size", [None, 4])
def test_one_group_is_bit_identical_to_the_former_loop(batch_size):
    model, conv, groups, spec = _setup()
    w, b, seed = groups[0]
    img, tr = _old_visualize(model, conv, w, b, *spec, SIZE, STEPS, CROPS, seed, batch_size=batch_size,
                             input_size=INPUT)
    new = _alone(model, conv, groups[0], spec, batch_size)
    assert torch.equal(new["images"], img) and torch.equal(new["transparency"], tr)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_batched_groups_equal_their_separate_runs(batch_size):
    model, conv, groups, spec = _setup()
    many = _many(model, conv, groups, spec, batch_size)
    for group, got in zip(groups, many):
        alone = _alone(model, conv, group, spec, batch_size)
        assert got["images"].shape == (group[0].shape[0], 3, SIZE, SIZE)
        assert float((got["images"] - alone["images"]).abs().max()) < TOL
        rel = (got["transparency"] - alone["transparency"]).abs().max() / alone["transparency"].abs().max()
        assert float(rel) < TOL
        np.testing.assert_allclose(got["history"], alone["history"], rtol=1e-4, atol=1e-6)
    # the groups did not collapse into one: different targets and seeds give different images
    assert float((many[0]["images"][:1] - many[2]["images"]).abs().max()) > 0.05


def test_a_groups_images_do_not_depend_on_its_batch_mates():
    model, conv, groups, spec = _setup()
    first = _many(model, conv, groups[:2], spec)[1]
    second = _many(model, conv, [groups[2], groups[1]], spec)[1]
    assert float((first["images"] - second["images"]).abs().max()) < TOL


def test_segments_cut_the_groups_crops_into_batches_of_the_limit():
    batches = render._segments([6, 4, 3], 5)
    assert batches == [[(0, 0, 5)], [(0, 5, 6), (1, 0, 4)], [(2, 0, 3)]]
    # every crop once, in order, no batch over the limit
    flat = [(g, i) for seg in batches for g, a, b in seg for i in range(a, b)]
    assert flat == [(g, i) for g, n in enumerate([6, 4, 3]) for i in range(n)]


def test_runs_of_targets_gather_consecutive_jobs_up_to_the_limit():
    assert render.runs_of_targets([3, 3, 2, 7, 1], 6) == [[0, 1], [2], [3], [4]]
    assert render.runs_of_targets([3, 3, 2], 8) == [[0, 1, 2]]
    assert render.runs_of_targets([3, 3], 0) == [[0], [1]]


# ----------------------------------------------------------------------------- stage 4
@pytest.mark.slow
def test_stage4_batched_feature_vis_equals_each_jobs_own_run(image_root, tmp_path):
    import os
    from tests.test_cli import run_inproc
    from tests.test_featurevis import FV_SMALL, MODEL, RUNTIME, TAG, red_green_checkpoint
    from utils.files.names import class_checkpoint
    store = tmp_path / "store"
    os.makedirs(store / "models_disentangled")
    runs = [class_checkpoint(TAG, c, [[0], [1]], "best")[:-4] for c in (0, 1)]
    channel1 = dict(red_green_checkpoint(), **{"disentangled.weight": torch.tensor(  # D1 + D2 - R = [0.5, -1]
        [[0.5, 0.0], [0.0, -1.0], [0.0, 0.0]]).view(3, 2, 1, 1)})
    for run, ck in zip(runs, (red_green_checkpoint(), channel1)):
        torch.save(ck, store / "models_disentangled" / f"{run}.pth")
    (tmp_path / "triples.txt").write_text("0 0 1\n1 0 1\n")
    common = ["--data_dir", image_root, "--model", MODEL, "--model_dir", store, *RUNTIME, *FV_SMALL]

    def stage4(out, *extra):
        proc = run_inproc("get_results.py", *common, "--out_dir", tmp_path / out, *extra)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def arrays(out, run):
        folder = tmp_path / out / "results_disentanglement"
        return [(folder / f"{run}_feature_vis_{a}.npy").read_bytes() for a in ("images", "transparency")]

    stage4("one", "--channel_of_interest", 0, "--classes_for_concept1", 0, "--classes_for_concept2", 1)
    stage4("plain", "--triples", tmp_path / "triples.txt")
    said = stage4("batched", "--triples", tmp_path / "triples.txt", "--fv_batch_targets", 6)
    assert "2 checkpoints in runs of up to 6 targets: 1 optimization\n" in said  # both jobs share one
    assert arrays("one", runs[0]) == arrays("plain", runs[0])  # the default: each job alone, byte for byte
    folder = "results_disentanglement"
    for run in runs:
        plain = np.load(tmp_path / "plain" / folder / f"{run}_feature_vis_images.npy")
        batched = np.load(tmp_path / "batched" / folder / f"{run}_feature_vis_images.npy")
        assert plain.shape == batched.shape == (3, 3, 24, 24)
        assert np.abs(plain - batched).max() < TOL
        assert (tmp_path / "batched" / "plots" / f"feature_vis_{run}.png").is_file()
