"""One store, several processes (issues 7.2, 8.2, 9.2-9.4): locks, ranks that disagree, mixed numerics.

- Two stage-1 runs started together on one store: exactly one writes, the other exits with one line
  naming the holder, and the store equals a single run's byte for byte.
- Under torchrun (2 gloo processes) each rank writes only its own chunk files: no file, hence no file
  page, is written by both ranks, and rank 1 never writes the arrays or the manifest.
- Ranks that see different data (a node-local copy with one file missing) all stop with one line
  before writing any row.
- Resuming with another CPU thread count is refused unless --allow_mixed_numerics, which is recorded.
- Stage 4 runs finishing at once keep every run's rows in the quantitative record.
"""
import builtins
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, make_image_folder, run_stage
from tests.test_unreadable import one_line_error

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out

SCRIPT = os.path.join(ROOT, "get_importances_for_classes.py")
SLOW = "tests.test_distributed:slow_tiny_resnet"
LOGGED = "tests.test_store_safety:logged_tiny_resnet"
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    e.pop("OMP_NUM_THREADS", None)
    return e


def args(data, store, model=SLOW, *extra):
    return ["--data_dir", data, "--store_dir", store, "--model", model, "--batch_size", "4", "--chunk_size", "4",
            "--num_workers", "0", "--device", "cpu", "--cpu_threads", "1", *extra]


def folder_of(store, model):
    return os.path.join(store, model.replace(".", "_").replace(":", "_") + "_channel_importances")


def store_bytes(folder):
    out = {}
    for name in ARRAYS:
        with open(os.path.join(folder, name + ".npy"), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("lock_data")), train_per_class=10, val_per_class=1)


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("single"))
    run_stage(SCRIPT, *args(data_root, store))  # in this process: what it computes, not how it runs
    return folder_of(store, SLOW)


def test_two_runs_on_one_store_one_writes(data_root, single, tmp_path):
    store = str(tmp_path)
    procs = [subprocess.Popen([sys.executable, SCRIPT, *args(data_root, store)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(subprocess.CompletedProcess([], r[0], r[1], r[2]) for r in results if r[0] == 2)
    winner_pid = next(p.pid for p, r in zip(procs, results) if r[0] == 0)
    msg = one_line_error(loser)
    assert "another run" in msg and f"pid {winner_pid} on {socket.gethostname()}" in msg
    assert store_bytes(folder_of(store, SLOW)) == store_bytes(single)


# ----------------------------------------------------------------------------- which rank writes what
def logged_tiny_resnet():
    """tiny_resnet in a process that logs every file it opens for writing (to $WRITE_LOG.rank{RANK})."""
    from tests.tiny_models import tiny_resnet
    log = f"{os.environ['WRITE_LOG']}.rank{os.environ.get('RANK', '0')}"
    real_open, real_os_open = builtins.open, os.open

    def note(path):
        with real_open(log, "a") as f:
            f.write(os.path.abspath(os.fspath(path)) + "\n")

    def logging_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *a, **k)

    def logging_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return real_os_open(path, flags, *a, **k)

    if not getattr(builtins.open, "logs_writes", False):  # the stages build a factory twice: patch once
        logging_open.logs_writes = True
        builtins.open, os.open = logging_open, logging_os_open
    return tiny_resnet()


def written(log_base, rank):
    with open(f"{log_base}.rank{rank}") as f:
        names = {line.strip() for line in f if line.strip()}
    # a file written under a temporary name (utils.files.leftovers) and renamed: its final name
    from utils.files.leftovers import final_name
    out = set()
    for n in names:
        base = os.path.basename(n)
        if base.startswith(".tmp_"):
            base = final_name(base)
        out.add(os.path.join(os.path.dirname(n), base))
    return out


def test_torchrun_ranks_write_disjoint_files(data_root, tmp_path):
    store, log = str(tmp_path / "store"), str(tmp_path / "writes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
           *args(data_root, store, LOGGED)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(WRITE_LOG=log), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    w0, w1 = written(log, 0), written(log, 1)
    folder = folder_of(store, LOGGED)
    assert w1 and not (w0 & w1), sorted(w0 & w1)
    assert all("/progress/chunk_" in n for n in w1), sorted(w1)  # rank 1: only its own chunk files
    chunks1 = sorted(int(os.path.basename(n)[6:13]) for n in w1)
    assert chunks1 == [1, 3, 5, 7, 9]
    for name in ARRAYS:
        assert os.path.join(folder, name + ".npy") in w0
    ref = str(tmp_path / "single")
    subprocess.run([sys.executable, SCRIPT, *args(data_root, ref, LOGGED)], cwd=ROOT,
                   env=env(WRITE_LOG=str(tmp_path / "w_single")), check=True, capture_output=True, timeout=300)
    assert store_bytes(folder) == store_bytes(folder_of(ref, LOGGED))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_with_different_data_all_stop(data_root, tmp_path):
    """Two ranks started by hand (as torchrun would) whose --data_dir copies differ by one file."""
    other = str(tmp_path / "other_copy")
    shutil.copytree(data_root, other)
    os.remove(os.path.join(other, "train", "class2", "img003.jpg"))
    store, port = str(tmp_path / "store"), str(_free_port())
    procs = []
    for rank, data in ((0, data_root), (1, other)):
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *args(data, store)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [subprocess.CompletedProcess([], p.wait(timeout=300), *p.communicate()) for p in procs]
    for r in results:
        msg = one_line_error(r)
        assert "rank 1 differs from the store's manifest" in msg and "nothing was written" in msg, msg
    progress = os.path.join(folder_of(store, SLOW), "progress")
    assert [f for f in os.listdir(progress) if f != "rows.json"] == []  # no chunk was written by anyone


def test_resume_with_other_thread_count(data_root, single, tmp_path):
    """A killed-and-resumed store: another --cpu_threads is refused, the recorded one is taken by default,
    and --allow_mixed_numerics goes on and records the change."""
    store = str(tmp_path)
    folder = folder_of(store, SLOW)
    shutil.copytree(single, folder)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["numerics"] == {"device": "cpu", "cpu_threads": 1}
    # make it an unfinished store again: chunks 5.. not done
    os.makedirs(os.path.join(folder, "progress"))
    for i in range(5):
        open(os.path.join(folder, "progress", f"chunk_{i:07d}"), "w").close()
    manifest["complete"] = False
    json.dump(manifest, open(os.path.join(folder, "manifest.json"), "w"))
    before = store_bytes(folder)
    base = [a for a in args(data_root, store) if a not in ("--cpu_threads", "1")]
    msg = one_line_error(run_stage(SCRIPT, *base, "--cpu_threads", "2", check=False))
    assert "1 threads" in msg and "2 threads" in msg and "--allow_mixed_numerics" in msg
    assert store_bytes(folder) == before
    # no flag: the recorded count, and the rows equal the uninterrupted store's
    proc = run_stage(SCRIPT, *base)
    assert "recorded --cpu_threads 1" in proc.stdout, proc.stderr
    assert store_bytes(folder) == store_bytes(single)


def test_mixed_numerics_allowed_is_recorded(data_root, single, tmp_path):
    store = str(tmp_path)
    folder = folder_of(store, SLOW)
    shutil.copytree(single, folder)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    os.makedirs(os.path.join(folder, "progress"))
    open(os.path.join(folder, "progress", "chunk_0000000"), "w").close()
    manifest["complete"] = False
    json.dump(manifest, open(os.path.join(folder, "manifest.json"), "w"))
    base = [a for a in args(data_root, store) if a not in ("--cpu_threads", "1")]
    run_stage(SCRIPT, *base, "--cpu_threads", "2", "--allow_mixed_numerics")
    done = json.load(open(os.path.join(folder, "manifest.json")))
    assert done["complete"] and done["numerics"] == {"device": "cpu", "cpu_threads": 2}
    assert [h["cpu_threads"] for h in done["numerics_history"]] == [1, 2]


def test_concurrent_quantitative_updates_keep_every_run(tmp_path):
    """Four processes record their rows at once; the record and the text files hold all of them."""
    code = ("import sys, numpy as np; from utils.files import registry; "
            "k = int(sys.argv[1]); "
            "rows = {{1: np.full((k + 1, 3), k, float), 2: np.full((1, 3), -k, float)}}; "
            "registry.update_quantitative({folder!r}, '', 0.03, f'run{{k}}', rows, {{}})")
    folder = str(tmp_path / "results_quantitative")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(folder=folder), str(k)], env=env())
             for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    runs = json.load(open(os.path.join(folder, "runs_required0.03.json")))
    assert sorted(runs) == [f"run{k}" for k in range(4)]
    rows1 = np.loadtxt(os.path.join(folder, "quantitative_concept1_required0.03.txt"), delimiter=",")
    assert len(rows1) == sum(k + 1 for k in range(4))


def test_pipeline_store_equals_a_plain_loop(data_root, tmp_path):
    """The stage-1 pipeline (uint8 images from the workers normalized on the device, deferred host copies,
    one file per chunk merged at the end) writes exactly the rows of a plain loop over float batches."""
    import torch

    from tests.tiny_models import tiny_resnet
    from utils.data import folders
    from utils.stages import stage1_pass
    store = str(tmp_path)
    tiny = "tests.tiny_models:tiny_resnet"
    run_stage(SCRIPT, "--data_dir", data_root, "--store_dir", store, "--model", tiny, "--batch_size", "4",
              "--chunk_size", "8", "--num_workers", "2", "--device", "cpu", "--cpu_threads", "1")
    got = {n: np.load(os.path.join(folder_of(store, tiny), n + ".npy")) for n in ARRAYS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_resnet()
        ds = folders.image_folder(data_root, "train")  # the float transform: ToTensor + Normalize in the worker
        rows = {n: [] for n in ARRAYS}
        for idx in folders.batches_of(list(range(len(ds))), 4):
            images = torch.stack([ds[i][0] for i in idx])
            labels = torch.tensor([ds.targets[i] for i in idx])
            A, pred, P = stage1_pass.stage1_batch(model, model.conv3, images, labels)
            for n, v in zip(ARRAYS, (A, labels, pred, P)):
                rows[n].append(v.numpy())
    finally:
        torch.set_num_threads(threads)
    for n in ARRAYS:
        want = np.concatenate(rows[n])
        assert got[n].dtype == want.dtype and got[n].tobytes() == want.tobytes(), n
