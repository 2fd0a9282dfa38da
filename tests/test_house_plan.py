"""The package's house plan (utils/__init__.py is its map) and the proof that moving code into it changed nothing.

1. The method rule: modules of the method's math (``utils/method/`` and the pure parts of the feature
   visualization) import nothing that reads or writes files, builds loaders, parses flags or prints. The check
   is an AST scan; a planted violation shows that it catches each kind.
2. Byte identity: the commit this layout started from (``BEFORE_PLAN``, taken from git as the k-way test
   does) and this tree run the same stages 1-4 on the demo (both ``--arch`` values, small) and on a generated
   case that touches every path (two layers, both importance signs, label-free concepts, --triples, k = 3,
   --concepts_file, --rho_score robust, --export_model, every stage-4 output, feature visualizations, the SAE
   view). Every file either writes is byte-identical, after taking out what no two runs share (times, process
   ids; see ``VOLATILE``).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DRIVER, PRISTINE, ROOT, demo_process, make_image_folder

BEFORE_PLAN = "1fdc866"  # main before utils/ moved into sub-packages

# ---------------------------------------------------------------------------------------------- the method rule
PURE_PACKAGES = ("utils/method",)
PURE_MODULES = ("utils/featurevis/param.py", "utils/featurevis/transform.py", "utils/featurevis/objectives.py")
FORBIDDEN_MODULES = ("argparse", "tqdm", "json", "pickle", "shutil", "glob", "tempfile", "subprocess",
                     "torch.utils.data", "torchvision.datasets", "PIL", "matplotlib")
FORBIDDEN_CALLS = ("print", "open", "input")


def pure_modules(root=ROOT):
    """Paths (relative to ``root``) of the modules the method rule covers."""
    out = [m for m in PURE_MODULES if os.path.isfile(os.path.join(root, m))]
    for pkg in PURE_PACKAGES:
        out += sorted(os.path.join(pkg, f) for f in os.listdir(os.path.join(root, pkg)) if f.endswith(".py"))
    return out


def _imported(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = ("." * node.level) + (node.module or "")
        return [base] if node.module else [f"{base}{a.name}" for a in node.names]
    return []


def rule_violations(source, where="<source>"):
    """What breaks the method rule in ``source``: one line per import of a file, loader, flag or printing
    module, of a ``utils`` module outside ``utils.method``, of a relative module, and per call of print/open/input."""
    out = []
    for node in ast.walk(ast.parse(source)):
        for name in _imported(node):
            if name.startswith("."):
                out.append(f"{where}:{node.lineno}: relative import {name} (write utils.method.X)")
            elif name.startswith("utils") and not name.startswith("utils.method"):
                out.append(f"{where}:{node.lineno}: imports {name}, outside utils.method")
            elif any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES):
                out.append(f"{where}:{node.lineno}: imports {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            out.append(f"{where}:{node.lineno}: calls {node.func.id}()")
    return out


def test_method_modules_keep_the_method_rule():
    mods = pure_modules()
    assert "utils/method/similarities.py" in mods and len(mods) >= 4
    problems = [p for m in mods for p in rule_violations(open(os.path.join(ROOT, m)).read(), m)]
    assert problems == []


def test_method_rule_catches_each_planted_violation():
    planted = ("import torch\nimport numpy as np\nfrom utils.method import similarities\n"  # allowed
               "from utils.files import atomic\nimport argparse\nfrom tqdm import tqdm\n"
               "from torch.utils.data import DataLoader\nfrom . import store\n"
               "def f(x):\n    print(x)\n    return open('a')\n")
    found = rule_violations(planted, "planted.py")
    assert [int(p.split(":")[1]) for p in found] == [4, 5, 6, 7, 8, 10, 11]


def test_package_map_names_every_sub_package():
    """utils/__init__.py's docstring is the map: it names every sub-package, and every module lives in one."""
    import utils
    doc = utils.__doc__
    utils_dir = os.path.join(ROOT, "utils")
    packages = sorted(d for d in os.listdir(utils_dir) if os.path.isfile(os.path.join(utils_dir, d, "__init__.py")))
    assert len(packages) >= 6
    assert [p for p in packages if f"``{p}/``" not in doc] == []
    modules = [f"{p}.{f[:-3]}" for p in packages for f in os.listdir(os.path.join(utils_dir, p))
               if f.endswith(".py") and not f.startswith("__")]
    assert [m for m in modules if f"``{m.split('.')[1]}``" not in doc] == []  # every module on the map
    loose = sorted(f[:-3] for f in os.listdir(utils_dir) if f.endswith(".py") and f != "__init__.py")
    assert loose == ["disentangle"]  # kept at its path: exported model files name utils.disentangle
    assert "``disentangle``" in doc


# ---------------------------------------------------------------------------------------------- byte identity
TINY = "tests.tiny_models:tiny_resnet"
MODEL = ["--model", TINY, "--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
SMALL_FV = ["--fv_size", "32", "--fv_steps", "3", "--fv_crops", "2", "--fv_spectrum_images", "8"]
SMALL_SAE = ["--sae_expansion", "2", "--sae_k", "2", "--sae_steps", "20", "--sae_positions_per_image", "2"]
PAIR = ["--classes_for_concept1", "0", "--classes_for_concept2", "1"]
STAGE4 = ["--get_qualitative", "--get_quantitative", "--get_top_images", "--top_k", "3"]


def case_calls(data, store, out, triples):
    """(script, args) of the generated case: every stage and the paths between them."""
    s0 = ["--data_dir", data, "--store_dir", store, *MODEL]
    # two layers' stores in one folder: stages 2-4 name the layer (a later --layer_of_interest conv2 wins)
    s1 = [*s0, "--layer_of_interest", "last_conv"]
    s4 = ["--data_dir", data, "--model_dir", store, *MODEL, "--layer_of_interest", "last_conv", "--out_dir", out,
          "--proportion_attribution_required", "0.0"]
    s2 = [*s1, "--out_dir", out, "--proportion_attribution_required", "0.05", "--p", "0.5", "--cos_sim_high", "1.0"]
    concepts = os.path.join(store, "results_get_cosine_similarities", "tests_tiny_models_tiny_resnet_concepts_top8.json")
    return [
        ("get_importances_for_classes.py", s0),
        ("get_importances_for_classes.py", [*s0, "--layer_of_interest", "conv2"]),
        ("get_cosine_similarities.py", s2),
        ("get_cosine_similarities.py", [*s2, "--importance_sign", "positive_activation"]),
        ("get_cosine_similarities.py", [*s2, "--layer_of_interest", "conv2"]),
        ("get_cosine_similarities.py", [*s1, "--label_free", "--channels", "0", "1", "--top_n", "8", "--k", "3"]),
        ("disentangle_channel.py", [*s1, "--channel_disentangle", "0", *PAIR, "--export_model"]),
        ("disentangle_channel.py", [*s1, "--channel_disentangle", "1", *PAIR, "--classes_for_concept3", "2",
                                    "--rho_score", "robust"]),
        ("disentangle_channel.py", [*s1, "--triples", triples]),
        ("disentangle_channel.py", [*s1, "--channel_disentangle", "0", "--concepts_file", concepts,
                                    "--clusters", "0", "2"]),
        ("disentangle_channel.py", [*s1, "--layer_of_interest", "conv2", "--channel_disentangle", "2", *PAIR]),
        ("get_results.py", [*s4, "--channel_of_interest", "0", *PAIR, *STAGE4, "--get_feature_vis", *SMALL_FV,
                            "--get_sae_view", *SMALL_SAE]),
        ("get_results.py", [*s4, "--channel_of_interest", "1", *PAIR, "--classes_for_concept3", "2", *STAGE4,
                            "--top_images_all_val"]),
        ("get_results.py", [*s4, "--triples", triples, "--get_quantitative", "--get_qualitative"]),
        ("get_results.py", [*s4, "--channel_of_interest", "0", "--concepts_file", concepts, "--clusters", "0", "2",
                            *STAGE4, "--get_feature_vis", *SMALL_FV]),
        ("get_results.py", [*s4, "--layer_of_interest", "conv2", "--channel_of_interest", "2", *PAIR, *STAGE4,
                            "--f", "0.3"]),
    ]




def old_tree(dst):
    """The whole tree of BEFORE_PLAN, from git (skip where git or the commit is missing)."""
    try:
        blob = subprocess.run(["git", "-C", ROOT, "archive", BEFORE_PLAN], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git or commit {BEFORE_PLAN} not available: no reference files")
    os.makedirs(dst)
    subprocess.run(["tar", "-x", "-C", str(dst)], input=blob.stdout, check=True)
    return str(dst)


def run_case(tree, work, triples_text):
    """Stages 1-4 of the generated case with the code of ``tree``, into ``work`` (made anew). Returns stdout."""
    if os.path.exists(work):
        shutil.rmtree(work)
    data, store, out = (os.path.join(work, d) for d in ("data", "store", "out"))
    make_image_folder(data, train_per_class=6, val_per_class=4)
    triples = os.path.join(work, "triples.txt")
    with open(triples, "w") as f:
        f.write(triples_text)
    calls = case_calls(data, store, out, triples)
    proc = subprocess.run([sys.executable, "-c", DRIVER, tree, json.dumps(calls)], cwd=tree,
                          env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print("\n".join(line for line in proc.stderr.splitlines() if re.match(r"[\d.]+ s  ", line)))
    return proc.stdout


# what no two runs share: JSON keys of times and process ids, and the same in printed text
VOLATILE_KEYS = re.compile(r"(^|_)(seconds|time|created|finished|started|updated|pid|elapsed|per_second|rate|when|"
                           r"date|duration)(_|$)|_s$", re.I)  # whole words: not "candidates", "degenerate"
VOLATILE_TEXT = re.compile(r"\d+(\.\d+)?( ?s\b| ?ms\b| images?/s| img/s)|\d{4}-\d\d-\d\d[T ][\d:.]+|pid \d+")


def without_progress_bars(text):
    """``text`` less tqdm's progress bars (their rates and times differ from run to run)."""
    return "\n".join(part for line in text.split("\n") for part in line.split("\r") if "%|" not in part)


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: (None if VOLATILE_KEYS.search(k) else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str):
        return VOLATILE_TEXT.sub("<t>", obj)
    return obj


def _plain(obj):
    """Tensors as their bytes in hex, so that a saved object can go through ``_scrub`` and ``json``."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "numpy"):
        return [str(obj.dtype), list(obj.shape), obj.contiguous().numpy().tobytes().hex()]
    return obj


def comparable(path, root=None):
    """A file's bytes, or for JSON, logs and reports its content without the volatile parts (``VOLATILE_*``);
    ``root``: the folder the run wrote into, written ``<root>`` wherever a file names it."""
    with open(path, "rb") as f:
        raw = f.read()
    if root:
        raw = raw.replace(root.encode(), b"<root>")
    if path.endswith(".json"):
        try:
            return json.dumps(_scrub(json.loads(raw)), sort_keys=True)
        except ValueError:
            return raw
    if path.endswith(".pt"):  # a cached SAE: its record holds the training time
        import torch
        text = json.dumps(_scrub(_plain(torch.load(path, map_location="cpu", weights_only=True))), sort_keys=True)
        return text.replace(root, "<root>") if root else text
    if path.endswith((".log", ".md", ".lock")) or os.path.basename(path) == "report.txt":
        return VOLATILE_TEXT.sub("<t>", without_progress_bars(raw.decode(errors="replace")))
    return raw


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def differing_files(a, b, extra_ok=(), roots=(None, None), new_keys=False):
    """Relative paths below ``a`` and ``b`` that are missing on one side or differ (``comparable``).

    extra_ok: files the new tree ``b`` may add (taken as prefixes of the relative path; ``("",)``: any), and
    JSON files the new tree may extend with keys the old one lacks (the new keys are left out of the
    comparison: ``comparable_as``); roots: the folders the old and the new run wrote into, where ``a`` and ``b``
    are copies (paths in the files are compared as ``<root>/...``); new_keys: JSON files may add keys without
    ``extra_ok`` (the store's ``digests``, stage 3's ``checkpoint_sha256``)."""
    fa, fb = _files(a), _files(b)
    out = sorted(f"only in {'old' if p in fa else 'new'}: {p}" for p in fa ^ fb
                 if p in fa or not any(p.startswith(e) for e in extra_ok))
    out += sorted(p for p in fa & fb if comparable(os.path.join(a, p), roots[0])
                  != comparable_as(os.path.join(b, p), os.path.join(a, p), bool(extra_ok) or new_keys, roots))
    return out


def extra_files(a, b):
    """Relative paths only the new tree ``b`` holds."""
    return sorted(_files(b) - _files(a))


def _restricted(new, old):
    """``new`` with only the keys ``old`` has (recursively in dicts)."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _restricted(v, old[k]) for k, v in new.items() if k in old}
    return new


def comparable_as(path, old_path, extended=False, roots=(None, None)):
    """``comparable(path, roots[1])``; with ``extended``, a JSON file less the keys the old file ``old_path`` lacks."""
    if not (extended and path.endswith(".json")):
        return comparable(path, roots[1])
    try:
        new = json.loads(_rooted(path, roots[1]))
        old = json.loads(_rooted(old_path, roots[0]))
    except ValueError:
        return comparable(path, roots[1])
    return json.dumps(_scrub(_restricted(new, old)), sort_keys=True)


def _rooted(path, root):
    """A text file's content with ``root`` written ``<root>``."""
    text = open(path, encoding="utf-8", errors="replace").read()
    return text.replace(root, "<root>") if root else text


def is_subsequence(old_lines, new_lines):
    """Whether every line of ``old_lines`` appears in ``new_lines`` in the same order (new lines may be added)."""
    it = iter(new_lines)
    return all(any(line == n for n in it) for line in old_lines)


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    return old_tree(tmp_path_factory.mktemp("before_plan") / "tree")


TRIPLES = "0 0 1\n2 1,2 3  # two classes as concept 1\n"


def test_generated_case_writes_the_same_files_as_before_the_plan(before, tmp_path):
    work = str(tmp_path / "case")  # the same path for both runs: paths inside the files agree
    old_out = run_case(before, work, TRIPLES)
    os.rename(work, str(tmp_path / "case_old"))
    new_out = run_case(ROOT, work, TRIPLES)
    n_files = sum(len(fs) for _, _, fs in os.walk(work))
    assert n_files > 100  # every stage wrote
    # the one change on purpose: channel 2's concept 1 has mean pos(D2) = 0, so its separation, once divided by
    # the 1e-12 floor (3.4e13), is now unbounded: null with a reason, and a printed reason
    unbounded = ("out/results_disentanglement/tests_tiny_models_tiny_resnet_channel2_classes1[1, 2]_classes2[3]_"
                 "f_best_unnormalized_summary.json")
    assert differing_files(str(tmp_path / "case_old"), work, new_keys=True) == [unbounded]
    was, now = (json.load(open(os.path.join(root, unbounded))) for root in (str(tmp_path / "case_old"), work))
    assert was["sep_concept1"] == pytest.approx(was["mean_pos_concept1"]["D1"] / 1e-12, rel=1e-6)
    assert was["mean_pos_concept1"]["D2"] == 0
    assert now["sep_concept1"] is None and now["sep_concept1_reason"].startswith("unbounded: mean pos(D2)")
    assert {k: v for k, v in now.items() if k in was and k != "sep_concept1"} == \
        {k: v for k, v in was.items() if k != "sep_concept1"}
    # every printed line of the old run, in order, the separation's line now unbounded; lines added since (stage
    # 2's advice with few candidates, the feature visualizations' plan and estimate) may come between them
    old_lines, new_lines = (VOLATILE_TEXT.sub("<t>", o).splitlines() for o in (old_out, new_out))
    was_line = [i for i, line in enumerate(old_lines) if line.endswith("= 3.44e+13")]
    now_line = [line for line in new_lines if "= unbounded: mean pos(D2)" in line]
    assert len(was_line) == 1 and len(now_line) == 1, (was_line, now_line)
    old_lines[was_line[0]] = now_line[0]
    assert is_subsequence(old_lines, new_lines)


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_demo_writes_the_same_files_as_before_the_plan(before, tmp_path, arch, request):
    """The demo runs of tests/test_demo.py (seed 0) and tests/test_demo_resnet.py, as they left their folder
    (conftest.PRISTINE), against the old tree's run with the same flags."""
    if arch == "cnn":
        request.getfixturevalue("demo_runs")(0)
    else:
        request.getfixturevalue("resnet_demo")
    pristine, new_root, args, new_report = PRISTINE[arch]
    old = str(tmp_path / "demo_old")
    proc = demo_process(old, [a for a in args if a != "--no_atlas"], tree=before)  # no atlas step before the plan
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the demo's last step (--candidates and the atlas) came after BEFORE_PLAN: its files, its log lines and its
    # report entries are extra; every file of the old run is the same, and its printed lines come in order
    print("extra in the new run:", extra_files(old, pristine))
    assert differing_files(old, pristine, extra_ok=("",), roots=(old, new_root)) == []

    def lines(text, root):
        return VOLATILE_TEXT.sub("<t>", without_progress_bars(text.replace(root, "<root>"))).splitlines()
    assert is_subsequence(lines(proc.stdout, old), lines(new_report, new_root))
