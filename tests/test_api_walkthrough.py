"""docs/python.md, run as written: its code blocks in one Python process (a notebook session), then the stage
scripts with the same flags in another; both write the same files, byte for byte (JSON less its times), and
the calls' ``.files`` are every file written; the output the page shows is what it prints (the lines without
decimals)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DRIVER, ROOT
from tests import digests

PAGE = os.path.join(ROOT, "docs", "python.md")
OUTPUTS = ("store", "out", "candidates", "atlas")  # what the page writes under nb/ (nb/data is its input)

# after the page: every api.Result of the session, {name: [files, command]}, into results.json
EPILOGUE = """
import json as _json
from utils.api import Result as _Result
with open("results.json", "w") as _f:
    _json.dump({k: [list(v.files), list(v.command)] for k, v in dict(globals()).items() if isinstance(v, _Result)},
               _f)
"""


def page_code(path=PAGE):
    """The page's ```python blocks, in order, as one program."""
    with open(path) as f:
        return "\n".join(re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M))


def shown_lines(path=PAGE):
    """The lines of the session's ```text blocks that no machine prints otherwise: without decimals (which the
    CPU's rounding may change), tensors or an ellipsis."""
    with open(path) as f:
        session = f.read().split("## From the data to the atlas, in a notebook", 1)[1]
    lines = [line for block in re.findall(r"^```text\n(.*?)^```", session, re.S | re.M) for line in block.splitlines()]
    return [line for line in lines if not re.search(r"\d\.\d|tensor\(|\.\.\.", line)]


def python(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def script_calls(cands_file, copy):
    """The page's calls as command lines, written out by hand: ``cands_file`` relative to the session folder,
    ``copy`` a copy of it from which the pair is chosen (the lowest cosine)."""
    with open(copy) as f:
        cands = json.load(f)["candidates"]
    best = min(cands, key=lambda d: d["cosine_similarity"])
    c, pair = str(best["channel"]), ["--classes_for_concept1", str(best["class1"]), "--classes_for_concept2",
                                     str(best["class2"])]
    s4 = ["--get_qualitative", "--get_quantitative", "--get_top_images"]
    return [
        ("get_importances_for_classes.py", ["--data_dir", "nb/data", "--store_dir", "nb/store", "--model",
                                            "demo.model:shapes_cnn", "--weights", "none", "--num_workers", "0"]),
        ("get_cosine_similarities.py", ["--store_dir", "nb/store", "--model", "demo.model:shapes_cnn", "--out_dir", "nb/out",
                                        "--proportion_attribution_required", "0.1", "--p", "0.5"]),
        ("disentangle_channel.py", ["--store_dir", "nb/store", "--model", "demo.model:shapes_cnn", "--channel_disentangle", c, "--num_workers", "0",
                                    *pair]),
        ("get_results.py", ["--model_dir", "nb/store", "--model", "demo.model:shapes_cnn", "--out_dir", "nb/out", "--channel_of_interest", c,
                            "--num_workers", "0", *s4, *pair]),
        ("disentangle_channel.py", ["--store_dir", "nb/store", "--model", "demo.model:shapes_cnn", "--candidates", cands_file, "--top", "2",
                                    "--num_workers", "0"]),
        ("get_results.py", ["--model_dir", "nb/store", "--model", "demo.model:shapes_cnn", "--out_dir", "nb/candidates", "--candidates", cands_file,
                            "--top", "2", "--num_workers", "0", *s4]),
        ("utils/atlas/__main__.py", ["--results", "nb/candidates", "--store", "nb/store", "--atlas", "nb/atlas",
                                     "--candidates", cands_file]),
    ]


def every_file(folder):
    """Every file below ``folder`` but hidden ones (locks), as the calls list them."""
    out = set()
    for d, dirs, fs in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        out |= {os.path.join(d, f) for f in fs if not f.startswith(".")}
    return out


@pytest.mark.slow
def test_python_page_writes_what_the_scripts_write(tmp_path):
    work = str(tmp_path / "session")  # the same path for both sessions: the paths inside the files agree
    os.makedirs(work)
    printed = python(["-c", page_code() + EPILOGUE], work)
    assert "did you mean channel_disentangle?" in printed  # the page's last block
    shown = shown_lines()
    assert len(shown) >= 5 and [line for line in shown if line not in printed.splitlines()] == []
    with open(os.path.join(work, "results.json")) as f:
        results = json.load(f)
    assert set(results) == {"r1", "r2", "r3", "r4", "r3s", "r4s", "site"}

    # .files: every file the session wrote, each listed by the call that wrote it last
    nb = os.path.join(work, "nb")
    listed = {p for files, _ in results.values() for p in files}
    assert listed == set().union(*(every_file(os.path.join(nb, o)) for o in OUTPUTS))
    assert len(listed) > 80  # 21 checkpoints per split, plots, records, the atlas
    assert all(p.startswith(os.path.join(nb, "store", "")) for p in results["r1"][0] + results["r3"][0])
    assert results["r1"][1][:2] == ["python", "get_importances_for_classes.py"]

    # the same calls through the scripts' command lines, in a fresh session folder with the same data
    api_side = str(tmp_path / "api_session")
    os.rename(work, api_side)
    os.makedirs(os.path.join(work, "nb"))
    shutil.copytree(os.path.join(api_side, "nb", "data"), os.path.join(nb, "data"))
    cands = [p for p in results["r2"][0] if p.endswith("_candidates.json")]
    assert len(cands) == 1
    calls = script_calls(os.path.relpath(cands[0], work), cands[0].replace(work, api_side, 1))
    python(["-c", DRIVER, ROOT, json.dumps(calls), work], work)  # the scripts' command lines, in the session folder
    assert digests.differing_files(nb, digests.folder_digest(os.path.join(api_side, "nb"), work), work) == []
