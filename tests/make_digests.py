"""Write tests/digests/COMMIT.json: the digests of the files an older commit's code writes in a byte-identity test.

    .venv/bin/python -m tests.make_digests 1fdc866 a34598c     # from the repository root; needs git and the commits

For each commit named, its code is taken from git (``git archive``) into a temporary folder and run as its test
runs it; the digests (tests/digests.py: sha256 per file of what the comparison looks at) go into
tests/digests/COMMIT.json (written to a temporary name, then renamed). Every run gets digests.THREADS torch threads.

  1fdc866  (tests/test_house_plan.py, the commit before utils/ moved into sub-packages) the generated case (stages
           1-4 on every path) and the demo at the tests' sizes in both layouts (tests/conftest.py's DEMO_CNN with
           seed 0, DEMO_RESNET; without --no_atlas, which that commit lacks).
  a34598c  (tests/test_kway.py, the commit before k-way splits) stages 3 and 4 with two concepts on a store that
           this checkout's stage 1 writes (the store is their input: both sides read the same one).

The digests hold for the CPU family and the library versions named in the file: CPU convolutions round by the
CPU and the thread count. Where the tests' runs of today's code differ from a digest on another kind of machine,
regenerate on that machine (a run of today's code cannot stand in for the older commit's: that is what is compared).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from tests import digests
from tests.conftest import DEMO_CNN, DEMO_RESNET, DRIVER, ROOT, demo_process, make_image_folder


def old_tree(commit, dst, paths=()):
    """The files of ``commit`` (all, or ``paths``) from git into ``dst``; returns ``dst``."""
    blob = subprocess.run(["git", "-C", ROOT, "archive", commit, *paths], capture_output=True, check=True).stdout
    os.makedirs(dst)
    subprocess.run(["tar", "-x", "-C", dst], input=blob, check=True)
    return dst


def run_calls(tree, calls):
    """(script, args) calls of ``tree``'s code one after the other in one process (tests/conftest.py's DRIVER) with
    digests.THREADS threads; returns stdout."""
    calls = [(script, [str(a) for a in args]) for script, args in calls]
    proc = subprocess.run([sys.executable, "-c", DRIVER, tree, json.dumps(calls)], cwd=tree, capture_output=True,
                          text=True, env=digests.threads_env(dict(os.environ, PYTHONPATH=tree)))
    if proc.returncode != 0:
        raise SystemExit(f"the calls of {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def demo_digest(tree, out, args):
    """The demo of ``tree`` with ``args`` into ``out``: its files (with their JSON key trees) and printed lines."""
    proc = demo_process(out, args, tree=tree)
    if proc.returncode != 0:
        raise SystemExit(f"the demo of {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"args": list(args), "files": digests.folder_digest(out, out, with_keys=True),
            "printed": digests.printed_lines(proc.stdout, out)}


def before_plan(tree, work):
    """1fdc866: the generated case of tests/test_house_plan.py and the demo in both layouts."""
    from tests.test_house_plan import TRIPLES, run_case
    case = os.path.join(work, "case")
    stdout = run_case(tree, case, TRIPLES)
    runs = {"case": {"files": digests.folder_digest(case, case, with_keys=True), "printed": digests.printed_lines(stdout, case),
                     "root": case}}  # the test runs today's case in the same folder (see test_house_plan)
    for name, args in (("demo_cnn", [*DEMO_CNN, "--seed", "0"]), ("demo_resnet", DEMO_RESNET)):
        runs[name] = demo_digest(tree, os.path.join(work, name), [a for a in args if a != "--no_atlas"])
    return runs


def before_kway(tree, work):
    """a34598c: stages 3 and 4 with two concepts (tests/test_kway.py's K2_*), on a store of this checkout's stage 1."""
    from tests.test_kway import INFO_NAME, k2_calls
    stage1, later = k2_calls(work, today=False)
    run_calls(ROOT, [stage1])
    run_calls(tree, later)
    models = os.path.join(work, "store", "models_disentangled")
    files = digests.folder_digest(models, work)
    with open(os.path.join(models, INFO_NAME), "rb") as f:  # today's file adds keys after these: kept in order
        raw = f.read()
    files[INFO_NAME] = {"sha256": digests.sha256(raw.replace(work.encode(), b"<root>")),
                        "key_order": list(json.loads(raw))}
    out = digests.folder_digest(os.path.join(work, "out"), work, skip=(".lock",))
    return {"k2": {"models_disentangled": files, "out": out}}


MAKERS = {"1fdc866": before_plan, "a34598c": before_kway}
PATHS = {"a34598c": ("disentangle_channel.py", "get_results.py", "utils", "tests/__init__.py", "tests/tiny_models.py")}


def machine():
    """The CPU, the thread count and the library versions the digests were made with."""
    import numpy
    import PIL
    import torch
    import torchvision
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": f"{platform.machine()} {cpu}", "torch_threads": digests.THREADS, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
            "python": platform.python_version()}


def make(commit):
    work = tempfile.mkdtemp(prefix=f"digests_{commit}_")
    try:
        tree = old_tree(commit, os.path.join(work, "tree"), PATHS.get(commit, ()))
        runs = MAKERS[commit](tree, os.path.join(work, "runs"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"commit": commit, "made_by": f"python -m tests.make_digests {commit}", "machine": machine(),
           "note": "sha256 of what tests/digests.py's comparable() reads, per file; they hold for this CPU family, "
                   "thread count and these library versions (CPU convolutions round by them)",
           "runs": runs}
    os.makedirs(digests.DIGEST_DIR, exist_ok=True)
    path = digests.path_of(commit)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {os.path.relpath(path, ROOT)}: " + ", ".join(
        f"{name} {sum(len(v) for k, v in run.items() if isinstance(v, dict))} files" for name, run in runs.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commits", nargs="*", metavar="COMMIT",
                   help=f"the commits whose digests to write: {', '.join(sorted(MAKERS))} (default: all)")
    commits = p.parse_args(argv).commits or sorted(MAKERS)
    unknown = [c for c in commits if c not in MAKERS]
    if unknown:
        p.error(f"no digests are made for {', '.join(unknown)}: the commits are {', '.join(sorted(MAKERS))}")
    for commit in commits:
        make(commit)


if __name__ == "__main__":
    main()
