"""benchmarks/: the stage benchmarks' workload (benchmarks/workload.py) and their imports, and one run of the stage
benchmarks on their smallest workload, whose implementations (ours, the published algorithm, the naive
baseline) must agree on what they compute, so that the benchmarks cannot rot unnoticed."""
import ast
import argparse
import json
import os

import pytest

from benchmarks import workload
from tests.conftest import ROOT


def test_workload_goes_through_its_flags_and_its_file_unchanged(tmp_path):
    p = workload.add_args(argparse.ArgumentParser())
    for wl in (workload.DEFAULT, workload.SMALLEST, workload.Workload(naive=False, workers=3, tau=0.01)):
        assert workload.Workload.from_args(p.parse_args(wl.flags())) == wl
        wl.save(str(tmp_path))
        assert workload.Workload.load(str(tmp_path)) == wl
    assert workload.Workload.from_args(p.parse_args([])) == workload.DEFAULT
    assert workload.DEFAULT.threads == (os.cpu_count() or 1)  # None: one thread per CPU
    with pytest.raises(Exception):
        workload.DEFAULT.classes = 3  # frozen
    assert workload.SMALLEST.key() != workload.DEFAULT.key()


def benchmark_imports():
    """{module: the benchmarks modules it imports} for every module under benchmarks/ (module names dotted)."""
    graph = {}
    for d, _, files in os.walk(os.path.join(ROOT, "benchmarks")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = found
    return {m: {i for i in imp if i in graph and i != m and i != "benchmarks"} for m, imp in graph.items()}


def cycle(graph):
    """One import cycle of ``graph`` as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_benchmarks_import_one_way():
    graph = benchmark_imports()
    assert "benchmarks.bench_stage4" in graph and "benchmarks.studies.tf32_effect" in graph
    assert graph["benchmarks.bench_stage4"] >= {"benchmarks.bench_stage3", "benchmarks.workload"}
    assert cycle(graph) is None
    assert cycle(dict(graph, **{"benchmarks.workload": {"benchmarks.bench_stage1"}})) is not None  # the check works


def import_path_edits(root=ROOT, folders=("benchmarks", "demo", "docs", "tests")):
    """[(file, line)] of every use of the module search path (``sys`` + ``.path``) in the Python files below
    ``folders``: they run as modules from the repository root (pytest: pytest.ini's pythonpath) instead."""
    found = []
    for folder in folders:
        for d, _, files in os.walk(os.path.join(root, folder)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    with open(path, encoding="utf-8") as fh:
                        tree = ast.parse(fh.read())
                    found += [(os.path.relpath(path, root), n.lineno) for n in ast.walk(tree)
                              if isinstance(n, ast.Attribute) and n.attr == "path"
                              and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    return found


def test_no_module_search_path_edits(tmp_path):
    assert import_path_edits() == []
    (tmp_path / "demo").mkdir()  # the check finds one
    edit = "sys" + ".path.insert(0, 'y')"  # in two pieces: a grep of the repository for such edits finds none
    (tmp_path / "demo" / "x.py").write_text(f"import os, sys\nos.path.join('a')\n{edit}\n")
    assert import_path_edits(str(tmp_path)) == [(os.path.join("demo", "x.py"), 3)]


@pytest.mark.slow
def test_stage_benchmarks_on_the_smallest_workload_agree(tmp_path, capsys):
    """run_all on workload.SMALLEST without the triples and fv rows: every stage's three implementations run in
    their child processes, and the numbers they compare agree within float16 rounding where one side is float16."""
    from benchmarks import run_all
    out = str(tmp_path / "bench.json")
    run_all.main([*workload.SMALLEST.flags(), "--no_fv", "--no_triples", "--json", out, "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    stages = json.load(open(out))["stages"]
    assert sorted(stages) == ["1", "2", "3", "4"] and "| end to end |" in printed
    for s in stages.values():
        assert s["ours_s"] > 0 and s["published_s"] > 0 and s["ratio"] == pytest.approx(s["published_s"] / s["ours_s"])
    one, two, three, four = (stages[k] for k in "1234")
    assert one["published_check"]["same_targets"] and one["published_check"]["same_predictions"]
    assert one["published_check"]["max_rel_diff"] < 1e-2 and one["naive_check"]["max_rel_diff"] < 1e-2  # float16
    assert one["store_bytes_per_image_published"] > one["store_bytes_per_image_ours"]
    assert two["used_pairs"] > two["arv_pairs"] > 0  # channels used by both classes: stage 2 has candidates
    assert two["naive_check"]["candidates_common"] == two["naive_check"]["candidates_ours"] > 0
    assert two["naive_check"]["max_cos_diff"] < 1e-2  # the naive ARVs: float16 per image
    assert three["naive_check"]["same_best_rho"] and three["naive_check"]["max_rel_score_diff"] < 1e-3
    assert three["published_check"]["max_rel_score_diff"] < 1e-2  # float16 ARVs
    assert four["published_check"]["same_images"] and four["published_check"]["max_rel_diff"] < 1e-3
    assert four["naive_check"]["max_rel_diff"] < 1e-3
