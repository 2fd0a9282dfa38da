"""Temporary files of a killed run (``utils.files.leftovers``): the next run removes them, and only them.

A writer killed with SIGKILL in the middle of ``atomic.atomic_path`` leaves its temporary file; beside it lie
a live writer's file (this process's), a file of a dead pid that another process still holds (as a writer in
another pid namespace would), one of another machine, one named as before this rule, and the final file.
Only the killed writer's goes; a rerun (the atlas's, stage 1's) removes it without touching the real files.
"""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_image_folder, run_stage
from utils.files import atomic, leftovers

KILLED = ("import os, signal, sys\nfrom utils.files import atomic\nwith atomic.atomic_path(sys.argv[1]) as tmp:\n"
          "    open(tmp, 'w').write('half a file')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
HOLDER = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
          "print('held', flush=True)\nsys.stdin.read()\n")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def killed_writer(path):
    """Write ``path`` in a process killed mid-write; returns (its pid, the temporary file it left)."""
    folder = os.path.dirname(path)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, path], env=_env())
    assert proc.wait() == -9
    left = sorted(set(os.listdir(folder)) - before)
    assert len(left) == 1, left
    return proc.pid, left[0]


def test_only_a_dead_writers_file_is_removed(tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "feature_vis_run.png").write_bytes(b"the picture of the last run")
    pid, left = killed_writer(str(folder / "feature_vis_run.png"))
    assert leftovers.final_name(left) == "feature_vis_run.png" and f".{pid}-{leftovers.host_tag()}-" in left
    other_host = "0" * 8 if leftovers.host_tag() != "0" * 8 else "1" * 8
    held = f".tmp_held.png.{pid}-{leftovers.host_tag()}-abcdefgh"  # a dead pid, but held: a live writer
    foreign = {held, f".tmp_far.png.{pid}-{other_host}-abcdefgh",  # another machine's: never judged here
               ".tmp_old.png.abcdefgh", ".tmp_notes.txt", "notes.txt"}  # other names
    for name in foreign:
        (folder / name).write_text("keep me")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / held)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with atomic.atomic_path(str(folder / "live.png")) as live:  # this process's own, in the middle of a write
            assert not os.path.exists(folder / left)  # the first write of a process into a folder swept it
            open(live, "w").write("being written")
            _, left = killed_writer(str(folder / "feature_vis_run.png"))
            assert leftovers.remove_stale(str(folder)) == [left]
            assert os.path.exists(live)
        assert sorted(os.listdir(folder)) == sorted(foreign | {"feature_vis_run.png", "live.png"})
        assert (folder / "feature_vis_run.png").read_bytes() == b"the picture of the last run"
    finally:
        holder.stdin.close()
        holder.wait()
    assert leftovers.remove_stale(str(folder)) == [held]  # its holder is gone now


def test_long_names_fit():
    prefix = leftovers.temp_prefix("x" * 250)
    assert len((prefix + "abcdefgh").encode()) <= 255 and leftovers.final_name(prefix + "abcdefgh") == "x" * 224


def test_checkpoints_do_not_hold_the_writers_pid(tmp_path):
    """torch.save names the archive inside the file after the file's name up to its last dot: that part of a
    temporary name is the same on every run, so a checkpoint's bytes do not depend on the writer's pid."""
    import zipfile
    import torch
    path = str(tmp_path / "x_unnormalized.pth")
    atomic.save_torch(path, {"w": torch.zeros(2)})
    assert {n.split("/")[0] for n in zipfile.ZipFile(path).namelist()} == {".tmp_x_unnormalized.pth"}


def test_a_rerun_of_the_atlas_removes_a_killed_runs_folder(tmp_path):
    from tests.test_atlas_safety import hostile_results
    from utils.atlas import write
    out, store, _ = hostile_results(str(tmp_path))
    folder = str(tmp_path / "site" / "atlas")
    write.write_atlas(out, store, None, folder)
    pid, left = killed_writer(str(tmp_path / "site" / "x"))  # a dead pid of this machine
    killed = tmp_path / "site" / left.replace(".tmp_x.", ".tmp_atlas.")  # the atlas's folder of a killed run
    (killed / "channels").mkdir(parents=True)
    (killed / "channels" / "index.html").write_text("half a page")
    before = open(os.path.join(folder, "index.html"), "rb").read()
    write.write_atlas(out, store, None, folder)
    assert sorted(os.listdir(tmp_path / "site")) == ["atlas"]  # the killed run's folder and file are gone
    assert open(os.path.join(folder, "index.html"), "rb").read() == before


@pytest.mark.slow
def test_stage_1_removes_a_killed_writers_file(tmp_path):
    """Stage 1 takes its store's lock, then removes the file a killed writer left in the store (here one of its
    manifest); the store it writes equals that of a run into an empty folder, byte for byte."""
    from tests.conftest import tree_bytes
    data = make_image_folder(str(tmp_path / "data"), train_per_class=2, val_per_class=1)

    def stage1(store):  # in this process: the killed writer is another one, and dead
        run_stage("get_importances_for_classes.py", "--data_dir", data, "--store_dir", store, "--model",
                  "tests.test_distributed:slow_tiny_resnet", "--batch_size", "4", "--num_workers", "0", "--device",
                  "cpu", "--cpu_threads", "1")
        return os.path.join(store, "tests_test_distributed_slow_tiny_resnet_channel_importances")

    clean = stage1(str(tmp_path / "clean"))
    folder = os.path.join(str(tmp_path / "store"), os.path.basename(clean))
    os.makedirs(folder)
    _, left = killed_writer(os.path.join(folder, "manifest.json"))
    assert stage1(str(tmp_path / "store")) == folder and not os.path.exists(os.path.join(folder, left))

    def arrays(f):
        return {k: v for k, v in tree_bytes(f).items() if k.endswith(".npy")}
    assert sorted(tree_bytes(folder)) == sorted(tree_bytes(clean)) and arrays(folder) == arrays(clean)
