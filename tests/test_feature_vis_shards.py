"""Stage 4's feature visualizations shared out over torchrun processes (2 CPU processes, gloo): every file equals
that of one process, each rank drew the jobs dealt to it, and an error of rank 0 stops both ranks before
anything is written."""
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, make_image_folder
from tests.digests import comparable
from tests.test_cli import run_inproc
from tests.test_featurevis import FV_SMALL, MODEL, TAG, red_green_checkpoint
from utils.featurevis.spectrum import load_or_make_spectrum
from utils.files.names import class_checkpoint
from utils.stages.feature_vis_shards import deal

SCRIPT = os.path.join(ROOT, "get_results.py")
JOBS = [(0, 0, 1), (1, 0, 1), (0, 2, 3)]  # (channel, class of concept 1, class of concept 2)
# the plan of --fv_batch_targets 6 (3 targets each): jobs 1 and 2 in one optimization (rank 0), job 3 (rank 1)
BATCH = ["--fv_batch_targets", "6"]


def run_names():
    return [class_checkpoint(TAG, c, [[a], [b]], "best")[:-4] for c, a, b in JOBS]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(data, store, triples file): three checkpoints of the colour net, the spectrum already in the store (so that
    no process makes it while another reads it, and every record says it was reused)."""
    work = tmp_path_factory.mktemp("fv_shards")
    data = make_image_folder(str(work / "data"), train_per_class=4, val_per_class=3)
    store = work / "store"
    os.makedirs(store / "models_disentangled")
    channel1 = dict(red_green_checkpoint(), **{"disentangled.weight": torch.tensor(  # D1 + D2 - R = [0.5, -1]
        [[0.5, 0.0], [0.0, -1.0], [0.0, 0.0]]).view(3, 2, 1, 1)})
    for (c, _, _), run in zip(JOBS, run_names()):
        torch.save(red_green_checkpoint() if c == 0 else channel1, store / "models_disentangled" / f"{run}.pth")
    load_or_make_spectrum(str(store), data, 24, 8, 4, 0)
    triples = work / "triples.txt"
    triples.write_text("".join(f"{c} {a} {b}\n" for c, a, b in JOBS))
    return data, str(store), str(triples)


def command(launcher, case, out, *extra):
    data, store, triples = case
    args = ["--data_dir", data, "--model", MODEL, "--model_dir", store, "--triples", triples, "--out_dir", out,
            "--num_workers", "0", "--device", "cpu", "--get_quantitative", *map(str, FV_SMALL), *extra]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee", "3",
                SCRIPT, *args]
    return [sys.executable, SCRIPT, *args]


def launch(launcher, case, out, *extra):
    # one intra-op thread in every process (torchrun's default for several processes): the same float sums
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(command(launcher, case, out, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def lines_of_rank(text, rank):
    """The lines torchrun's --tee marked as printed by ``rank`` (``[default{rank}]:...``)."""
    return [line.split(":", 1)[1] for line in text.splitlines() if re.match(rf"\[default{rank}\]:", line)]


def test_deal_gives_every_optimization_to_one_rank_round_robin():
    plan = [[0, 1], [2], [3], [4, 5], [6]]
    shares = [deal(plan, r, 3) for r in range(3)]
    assert shares == [[[0, 1], [4, 5]], [[2], [6]], [[3]]]
    assert sorted(j for s in shares for run in s for j in run) == list(range(7))


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(case, tmp_path):
    single, shared = str(tmp_path / "single"), str(tmp_path / "shared")
    one = launch("single", case, single, *BATCH)
    assert one.returncode == 0, one.stdout + one.stderr
    two = launch("torchrun", case, shared, *BATCH)
    assert two.returncode == 0, two.stdout + two.stderr
    runs = run_names()
    # every job has its figure, and the same files exist in both folders
    assert files_under(single) == files_under(shared)
    assert {f"plots/feature_vis_{r}.png" for r in runs} <= set(files_under(shared))
    for f in files_under(single):  # JSON less its times; everything else byte for byte
        assert comparable(os.path.join(shared, f), shared) == comparable(os.path.join(single, f), single), f
    # the work was shared: rank 0 drew jobs 1 and 2 (one optimization), rank 1 job 3; rank 0 wrote the results
    wrote = {rank: [r for r in runs if any(f"feature_vis_{r}.png" in line and "wrote" in line
                                           for line in lines_of_rank(two.stdout, rank))] for rank in (0, 1)}
    assert wrote == {0: runs[:2], 1: runs[2:]}, two.stdout
    assert "3 checkpoints in runs of up to 6 targets: 2 optimizations, shared out over 2 processes" in two.stdout
    assert not any("=== " in line for line in lines_of_rank(two.stdout, 1))


@pytest.mark.slow
def test_an_error_of_rank_0_stops_both_before_anything_is_written(case, tmp_path):
    data, store, triples = case
    bad = tmp_path / "data"
    subprocess.run(["cp", "-r", data, str(bad)], check=True)
    (bad / "val" / "class2" / "img000.jpg").write_bytes(b"not a JPEG")  # read by rank 0's pass only
    out = str(tmp_path / "out")
    proc = launch("torchrun", (str(bad), store, triples), out)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "img000.jpg" in said and "rank 0 stopped:" in said, said
    assert not os.path.exists(out) or files_under(out) == []


def test_stage4_under_torchrun_without_feature_vis_is_refused(case, tmp_path):
    data, store, triples = case
    proc = run_inproc("get_results.py", "--data_dir", data, "--model", MODEL, "--model_dir", store, "--triples",
                      triples, "--out_dir", tmp_path, "--device", "cpu", "--get_quantitative",
                      env={"WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "under torchrun" in proc.stderr and proc.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []
