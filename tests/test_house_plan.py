"""The package's house plan (utils/__init__.py is its map) and the proof that moving code into it changed nothing.

1. The method rule: modules of the method's math (``utils/method/`` and the pure parts of the feature
   visualization) import nothing that reads or writes files, builds loaders, parses flags or prints. The check
   is an AST scan; a planted violation shows that it catches each kind.
2. The parameter rule: no function in utils/ takes more than ``MAX_PARAMETERS`` parameters (self and cls not
   counted, *args and **kwargs one each); values that travel together are one frozen object (a scan plan, a
   layer, the MACO settings, the model input). An AST scan again, with a planted function to show it counts.
3. Byte identity: the commit this layout started from (``BEFORE_PLAN``) and this tree run the same stages 1-4 on
   the demo (both ``--arch`` values, small) and on a generated case that touches every path (two layers, both
   importance signs, label-free concepts, --triples, k = 3, --concepts_file, --rho_score robust, --export_model,
   every stage-4 output, feature visualizations, the SAE view). Every file either writes is byte-identical, after
   taking out what no two runs share (times, process ids; tests/digests.py). The older commit's side is its
   checked-in digests (tests/digests/1fdc866.json, written by ``python -m tests.make_digests 1fdc866``).
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import digests
from tests.conftest import DRIVER, PRISTINE, ROOT, make_image_folder

BEFORE_PLAN = "1fdc866"  # main before utils/ moved into sub-packages: its runs' digests are tests/digests/1fdc866.json

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


# ---------------------------------------------------------------------------------------------- the parameter rule
MAX_PARAMETERS = 8


def parameter_count(node):
    """Parameters of a function node: positional-only, positional and keyword-only ones, *args and **kwargs one
    each, a first ``self`` or ``cls`` not counted."""
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    first = (a.posonlyargs + a.args)[:1]
    return n - (1 if first and first[0].arg in ("self", "cls") else 0)


def long_signatures(source, where="<source>", limit=MAX_PARAMETERS):
    """'where:line name (n)' of every function (nested ones and methods too) of ``source`` over ``limit``."""
    return [f"{where}:{node.lineno} {node.name} ({parameter_count(node)})" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > limit]


def test_no_function_in_utils_takes_more_than_eight_parameters():
    found, seen = [], 0
    for folder, _, files in os.walk(os.path.join(ROOT, "utils")):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found += long_signatures(open(path).read(), os.path.relpath(path, ROOT))
                seen += 1
    assert seen > 50 and found == []


def test_parameter_rule_counts_as_it_says():
    planted = ("def eight(a, b, c, d, e, f, g, h):\n    pass\n"                        # 8: allowed
               "def nine(a, b, c, d, e, f, g, h, i=1):\n    pass\n"                    # 9
               "def starred(a, b, c, d, e, f, g, *args, **kwargs):\n    pass\n"        # 7 + 2 = 9
               "def keywords(a, /, b, c, d, e, f, *, g, h, i):\n    pass\n"            # 9
               "class K:\n"
               "    def method(self, a, b, c, d, e, f, g, h):\n        pass\n"        # self not counted: 8
               "    @classmethod\n"
               "    def build(cls, a, b, c, d, e, f, g, h, i):\n        pass\n"       # 9
               "def outer(x):\n"
               "    def inner(a, b, c, d, e, f, g, h, i):\n        pass\n"            # nested: 9
               "async def later(a, b, c, d, e, f, g, h, i):\n    pass\n")             # 9
    found = long_signatures(planted, "planted.py")
    assert sorted(found, key=lambda p: int(p.split(":")[1].split()[0])) == [
        "planted.py:3 nine (9)", "planted.py:5 starred (9)", "planted.py:7 keywords (9)",
        "planted.py:13 build (9)", "planted.py:16 inner (9)", "planted.py:18 later (9)"]


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
    # disentangle: kept at its path (exported model files name utils.disentangle); errors and finite: the bottom,
    # which every sub-package may import (they import nothing of ours but errors)
    assert loose == ["disentangle", "errors", "finite"]
    assert all(f"``{m}``" in doc for m in loose)
    for m in ("errors", "finite"):
        src = open(os.path.join(utils_dir, m + ".py")).read()
        assert [line for line in src.splitlines() if line.startswith(("from utils", "import utils"))
                and "utils.errors" not in line] == []


# ---------------------------------------------------------------------------------------------- one flag boundary
FLAG_READ = re.compile(r"args\.")  # a parsed namespace (args, kwargs, ...) read: what docs/README.md's rule names


def flag_reads(source, where="<source>"):
    """``where:line`` of each line of ``source`` that reads a parsed namespace (``args.``): only the four scripts
    and utils/run/ may."""
    return [f"{where}:{n}" for n, line in enumerate(source.splitlines(), start=1) if FLAG_READ.search(line)]


def test_only_the_scripts_and_utils_run_read_the_parsed_flags():
    utils_dir = os.path.join(ROOT, "utils")
    found, seen = [], 0
    for d, dirs, files in os.walk(utils_dir):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        rel = os.path.relpath(d, ROOT)
        for f in sorted(files):
            if f.endswith(".py"):
                seen += 1
                if rel != os.path.join("utils", "run"):
                    found += flag_reads(open(os.path.join(d, f)).read(), os.path.join(rel, f))
    assert seen > 50 and found == []


def test_flag_read_rule_catches_a_planted_read():
    planted = ("def f(settings, args):\n    n = settings.top\n    return args.top\n"
               "def g(**kwargs):\n    return [k for k in kwargs.items()]\n# parsed.args: fine\n")
    assert flag_reads(planted, "planted.py") == ["planted.py:3", "planted.py:5"]


def package_imports(files):
    """{(a, b): [where]} for each import of sub-package (or top module) b of utils in a file of a: ``files`` maps a
    path under utils/ ('run/cli.py', 'errors.py') to its source. ``__main__.py`` files are entry points, front ends
    like the stage scripts, and are left out."""
    edges = {}
    for path, source in files.items():
        parts = path.split("/")
        if parts[-1] == "__main__.py":
            continue
        src = parts[0] if len(parts) > 1 else parts[0][:-3]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
                mods = [f"utils.{a.name}" for a in node.names] if node.module == "utils" else [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names if a.name.split(".")[0] == "utils"]
            else:
                continue
            for m in mods:
                dst = m.split(".")[1] if "." in m else None
                if dst and dst != src:
                    edges.setdefault((src, dst), []).append(f"{path}:{node.lineno}")
    return edges


def import_cycles(edges):
    """The pairs (a, b) of an import a -> b where b also reaches a through imports (a cycle), sorted."""
    out = {}
    for a, b in edges:
        out.setdefault(a, set()).add(b)

    def reaches(x, goal, seen):
        return x == goal or any(y not in seen and not seen.add(y) and reaches(y, goal, seen) for y in out.get(x, ()))
    return sorted((a, b) for a, b in edges if reaches(b, a, set()))


def test_no_import_cycle_between_the_sub_packages():
    """utils/ is layered: errors and finite at the bottom, run/ at the top (with the scripts); no sub-package
    imports one that imports it back, directly or through others."""
    utils_dir = os.path.join(ROOT, "utils")
    files = {}
    for d, dirs, fs in os.walk(utils_dir):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in fs:
            if f.endswith(".py"):
                files[os.path.relpath(os.path.join(d, f), utils_dir).replace(os.sep, "/")] = open(os.path.join(d, f)).read()
    edges = package_imports(files)
    assert len(files) > 80 and ("stages", "method") in edges and ("run", "stages") in edges
    assert import_cycles(edges) == [], {e: edges[e] for e in import_cycles(edges)}
    assert not [e for e in edges if e[1] == "run"]  # nothing below imports the top
    assert not [e for e in edges if e[0] in ("errors", "finite") and e[1] != "errors"]  # the bottom


def test_import_cycle_rule_catches_planted_cycles():
    planted = {"a/x.py": "from utils.b import y\n", "b/y.py": "import utils.c.z\n", "c/z.py": "from utils import a\n",
               "d/w.py": "from utils.a import x\n", "b/__main__.py": "from utils.d import w\n"}
    assert import_cycles(package_imports(planted)) == [("a", "b"), ("b", "c"), ("c", "a")]
    del planted["c/z.py"]
    assert import_cycles(package_imports(planted)) == []  # b's __main__ is an entry point: d -> a -> b is no cycle


def test_stage_settings_are_frozen_and_their_defaults_are_the_flags():
    """Every stage's Settings is a frozen dataclass built by keyword from its required fields alone, and what
    those defaults say equals what the command line gives without the flags (utils/run/settings_of_flags.py)."""
    import dataclasses
    import get_cosine_similarities
    import get_importances_for_classes
    import disentangle_channel
    import get_results
    from utils.concepts.source import ConceptSource
    from utils.featurevis import settings as fv
    from utils.run import context, settings_of_flags as of
    from utils.stages import label_free, sae_view, stage1, stage2, stage3, stage4
    pair = ["--classes_for_concept1", "0", "--classes_for_concept2", "1"]
    s3 = disentangle_channel.build_parser().parse_args(["--store_dir", "S", "--channel_disentangle", "3", *pair])
    s4 = get_results.build_parser().parse_args(["--model_dir", "S", "--channel_of_interest", "3", *pair])
    cases = [  # (Settings class, its required fields, the settings of the flags with only those given)
        (stage1.Settings, {"store_dir": "S"},
         of.stage1(get_importances_for_classes.build_parser().parse_args(["--store_dir", "S"]))),
        (stage2.Settings, {"store_dir": "S"}, of.stage2(get_cosine_similarities.build_parser().parse_args(
            ["--store_dir", "S"]))),
        (label_free.Settings, {"store_dir": "S"}, of.label_free(get_cosine_similarities.build_parser().parse_args(
            ["--store_dir", "S", "--label_free"]))),
        (stage3.Settings, {"store_dir": "S"},  # the concepts are no flag default; the workers: resolved
         dataclasses.replace(of.stage3(s3), source=ConceptSource(), num_workers=None)),
        (stage4.Settings, {"model_dir": "S"}, dataclasses.replace(of.stage4(s4), source=ConceptSource())),
        (fv.Settings, {}, of.feature_vis(s4, context.Spec())),
        (sae_view.Settings, {}, of.sae_view(s4, context.Spec())),
    ]
    for cls, required, of_flags in cases:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
        assert {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING} == set(required), cls
        built = cls(**required)
        assert built == of_flags, (cls, built, of_flags)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.batch_size = 3
    assert of.stage3(s3).source.triples[0].concepts == [[0], [1]] and of.stage3(s3).source.channel == 3
    assert stage4.Settings(model_dir="M", quantitative=True).top_k == 8  # a notebook's: only what it cares about


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
                          env=digests.threads_env(dict(os.environ, PYTHONPATH=tree)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print("\n".join(line for line in proc.stderr.splitlines() if re.match(r"[\d.]+ s  ", line)))
    return proc.stdout


TRIPLES = "0 0 1\n2 1,2 3  # two classes as concept 1\n"

# the one change on purpose since BEFORE_PLAN: channel 2's concept 1 has mean pos(D2) = 0, so its separation, once
# divided by the 1e-12 floor (3.4e13), is now unbounded: null with a reason, and a printed reason
UNBOUNDED = ("out/results_disentanglement/tests_tiny_models_tiny_resnet_channel2_classes1[1, 2]_classes2[3]_"
             "f_best_unnormalized_summary.json")


@pytest.mark.slow
def test_generated_case_writes_the_same_files_as_before_the_plan():
    """Every file of the generated case and every printed line, against the digests of BEFORE_PLAN's run, but for
    the one unbounded separation (``UNBOUNDED``); printed lines added since (stage 2's advice with few candidates,
    the feature visualizations' plan and estimate) may come between the old ones. The case runs in the folder that
    run wrote into (the digest's root): the files name it, and stage 3 and 4 record the sha256 of the concepts
    file, which names it too."""
    old = digests.load(BEFORE_PLAN)["runs"]["case"]
    with digests.folder_of_its_own(old["root"]) as work:
        printed = digests.printed_lines(run_case(ROOT, work, TRIPLES), work)
        n_files = sum(len(fs) for _, _, fs in os.walk(work))
        assert n_files > 100 and n_files == len(old["files"])  # every stage wrote
        assert digests.differing_files(work, old["files"], work) == [UNBOUNDED]
        now = json.load(open(os.path.join(work, UNBOUNDED)))
    assert now["mean_pos_concept1"]["D2"] == 0 and now["mean_pos_concept1"]["D1"] > 0
    assert now["sep_concept1"] is None and now["sep_concept1_reason"].startswith("unbounded: mean pos(D2)")
    was_line = [i for i, line in enumerate(old["printed"]) if line.endswith("= 3.44e+13")]
    now_line = [line for line in printed if "= unbounded: mean pos(D2)" in line]
    assert len(was_line) == 1 and len(now_line) == 1, (was_line, now_line)
    expected = list(old["printed"])
    expected[was_line[0]] = now_line[0]
    assert digests.is_subsequence(expected, printed)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_demo_writes_the_same_files_as_before_the_plan(arch, request):
    """The demo runs of tests/test_demo.py (seed 0) and tests/test_demo_resnet.py, as they left their folder
    (conftest.PRISTINE), against the digests of BEFORE_PLAN's run with the same flags (less --no_atlas)."""
    if arch == "cnn":
        request.getfixturevalue("demo_runs")(0)
    else:
        request.getfixturevalue("resnet_demo")
    pristine, new_root, args, new_stdout = PRISTINE[arch]
    old = digests.load(BEFORE_PLAN)["runs"][f"demo_{arch}"]
    assert old["args"] == [a for a in args if a != "--no_atlas"]  # no atlas step before the plan
    # the demo's last step (--candidates and the atlas) came after BEFORE_PLAN: its files, its log lines and its
    # report entries are extra; every file of the old run is the same, and its printed lines come in order
    print("extra in the new run:", sorted(set(digests.files_below(pristine)) - set(old["files"])))
    assert len(old["files"]) > 50
    # stage 4's log now also holds the feature visualizations' plan and estimate lines (the demo's stdout, whose
    # old lines are checked in order below, holds the rest of it); every other file byte for byte
    assert digests.differing_files(pristine, old["files"], new_root, extra_ok=True, skip=("logs/stage4.log",)) == []
    assert digests.is_subsequence(old["printed"], digests.printed_lines(new_stdout, new_root))
