"""benchmarks/gpu_suite.sh as a dry run (SMALL=1) on the CPU: its table, the CUDA rows marked skipped, and the
store comparison, which on a machine without CUDA compares a CPU store with a CPU store and must find 0."""
import os
import re
import subprocess

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses or demo runs: pytest -m "not slow" leaves them out


def test_gpu_suite_dry_run_table(tmp_path):
    env = dict(os.environ, SMALL="1", ONLY="compare", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               SITE=str(tmp_path / "site"),
               PYTHONPATH=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("step "))
    rows = {ln.split("|")[0].strip(): ln.split("|")[2].strip() for ln in lines[header + 1:] if "|" in ln}
    assert re.match(r"24\+8\+4 JPEGs in [\d.]+ s", rows["setup"])
    compare = next(v for k, v in rows.items() if k.startswith("store ") and "CPU store" in k)
    if not torch.cuda.is_available():
        assert "median 0, max 0" in compare and "patch sums max rel. 0;" in compare
        assert "predictions changed 0 of 4" in compare
    with open(tmp_path / "out" / "gpu_suite.txt") as f:
        assert f.read().splitlines()[1:] == lines[header:]  # the same table, written to $OUT
    assert "===== store vs CPU store" in (tmp_path / "out" / "logs.txt").read_text()
    rows.pop("install .whl", None)  # where wheels are carried in .whl/
    assert len(rows) == 2  # ONLY: the setup and the one step asked for
