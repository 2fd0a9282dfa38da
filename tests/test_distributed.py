"""Stage 1 under torchrun (2 CPU processes, gloo): the store is byte-identical to a single-process run,
also when a run is interrupted and resumed under either launcher."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_image_folder, run_stage

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out

SCRIPT = os.path.join(ROOT, "get_importances_for_classes.py")
SLOW_MODEL = "tests.test_distributed:slow_tiny_resnet"
FOLDER = "tests_test_distributed_slow_tiny_resnet_channel_importances"
ARRAYS = ("attributions", "targets", "predictions", "patch_sums")
NUM_CHUNKS = 10  # 40 images, chunks of 4


def slow_tiny_resnet():
    """tiny_resnet that sleeps before each batch, so that a run can be interrupted half-way."""
    from tests.tiny_models import tiny_resnet
    model = tiny_resnet()
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(0.2))
    return model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("ddp_data")), train_per_class=10, val_per_class=1)


def command(launcher, data_root, store_dir):
    args = ["--data_dir", data_root, "--store_dir", store_dir, "--model", SLOW_MODEL, "--batch_size", "4",
            "--chunk_size", "4", "--num_workers", "0", "--device", "cpu", "--cpu_threads", "1"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, *args]
    return [sys.executable, SCRIPT, *args]


def env():
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("OMP_NUM_THREADS", None)
    return e


def run(launcher, data_root, store_dir):
    """A run to its end: under torchrun a real launch; a single process's run in this one (``run_stage``)."""
    if launcher == "single":
        return run_stage(SCRIPT, *command(launcher, data_root, store_dir)[2:])
    proc = subprocess.run(command(launcher, data_root, store_dir), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{launcher} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def chunks_done(progress):
    """Finished chunks in a store's progress/ folder (temporary files of a chunk being written excluded)."""
    return [f for f in os.listdir(progress) if f.startswith("chunk_")] if os.path.isdir(progress) else []


def run_interrupted(launcher, data_root, store_dir, after_chunks=2):
    """Start a run and press Ctrl-C (SIGINT to the whole process group) once ``after_chunks`` chunks are done."""
    out, manifest, done = _interrupt_once(launcher, data_root, store_dir, after_chunks)
    assert not manifest["complete"] and 0 < done < NUM_CHUNKS, (f"the run was not interrupted half-way (SIGINT "
                                                                f"here: {signal.getsignal(signal.SIGINT)}):\n{out}")
    return done


def _interrupt_once(launcher, data_root, store_dir, after_chunks):
    """One run, interrupted once ``after_chunks`` chunks are done: (its output, the manifest, chunks done)."""
    progress = os.path.join(store_dir, FOLDER, "progress")
    # Ctrl-C as the default action in the child, whatever this process does with it: a signal this process
    # ignores stays ignored in its children, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(command(launcher, data_root, store_dir), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(chunks_done(progress)) >= after_chunks:
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    manifest = json.load(open(os.path.join(store_dir, FOLDER, "manifest.json")))
    return out, manifest, len(chunks_done(progress)) if os.path.isdir(progress) else NUM_CHUNKS


def read_store(store_dir):
    folder = os.path.join(store_dir, FOLDER)
    arrays = {}
    for name in ARRAYS:
        with open(os.path.join(folder, name + ".npy"), "rb") as f:
            arrays[name] = f.read()
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["complete"] and not os.path.exists(os.path.join(folder, "progress"))
    for key in ("created", "finished"):
        manifest.pop(key)
    return arrays, manifest


def assert_same_store(a, b):
    arrays_a, manifest_a = read_store(a)
    arrays_b, manifest_b = read_store(b)
    for name in ARRAYS:
        assert arrays_a[name] == arrays_b[name], f"{name}.npy differs"
    assert manifest_a == manifest_b


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    store_dir = str(tmp_path_factory.mktemp("single"))
    run("single", data_root, store_dir)
    return store_dir


def test_torchrun_two_processes_identical_to_one(data_root, reference, tmp_path):
    proc = run("torchrun", data_root, str(tmp_path))
    assert "2 processes" in proc.stdout and "done: 40 images" in proc.stdout
    assert_same_store(reference, str(tmp_path))


@pytest.mark.parametrize("first,second", [("torchrun", "torchrun"), ("torchrun", "single"),
                                          ("single", "torchrun")])
def test_interrupted_and_resumed_identical(data_root, reference, tmp_path, first, second):
    done = run_interrupted(first, data_root, str(tmp_path))
    proc = run(second, data_root, str(tmp_path))
    assert "resuming" in proc.stdout and f"{done} chunks already done" in proc.stdout
    assert_same_store(reference, str(tmp_path))
