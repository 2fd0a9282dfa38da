"""docs/method.md against the code: the defaults and constants the page states are the parsers' and the modules'.

The page's section "Defaults and the paper's values" holds two tables: the flags (flag | stage | default | the
paper's value | what it sets) and the constants that are not flags (constant | value | where). Each stated
default must equal ``build_parser().get_default`` of the stage's script, each constant the module's, and the
page's command for the paper's candidate list must pass the table's paper values.
"""
import functools
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "method.md")
SECTION = "## Defaults and the paper's values"
SCRIPTS = {1: "get_importances_for_classes", 2: "get_cosine_similarities", 3: "disentangle_channel",
           4: "get_results"}
# the defaults a reader of the method needs: the table must state each of these (flag, stage)
REQUIRED = {("--proportion_attribution_required", 2), ("--p", 2), ("--cos_sim_low", 2), ("--cos_sim_high", 2),
            ("--importance_sign", 2), ("--top_n", 2), ("--k", 2), ("--rho_score", 3), ("--exactness_images", 3),
            ("--proportion_attribution_required", 4), ("--f", 4)}


def section_text():
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    assert SECTION in text, f"docs/method.md has no section '{SECTION}'"
    rest = text.split(SECTION, 1)[1]
    return re.split(r"^## ", rest, maxsplit=1, flags=re.M)[0]


def tables(text):
    """Every markdown table of ``text`` as (header cells, [row cells]), separator lines dropped."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = (cells, [])
                out.append(current)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current[1].append(cells)
        else:
            current = None
    return out


def table(header0):
    found = [rows for head, rows in tables(section_text()) if head[0] == header0]
    assert len(found) == 1, f"one table whose first column is '{header0}' expected in '{SECTION}'"
    return found[0]


def value(cell):
    """A stated value: `none` -> None, a number -> int or float, else the text (backticks dropped)."""
    v = cell.strip().strip("`")
    if v == "none":
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def flag_rows():
    """[(flag, stage, default cell, paper cell)] of the flags table."""
    return [(row[0].strip("`"), int(row[1]), row[2], row[3]) for row in table("flag")]


@functools.lru_cache(maxsize=None)
def parser(stage):
    return importlib.import_module(SCRIPTS[stage]).build_parser()


def parser_default(stage, flag):
    p = parser(stage)
    actions = [a for a in p._actions if flag in a.option_strings]
    assert actions, f"{SCRIPTS[stage]}.py has no flag {flag}"
    return p.get_default(actions[0].dest)


def test_the_table_states_every_default_the_method_depends_on():
    stated = {(flag, stage) for flag, stage, _, _ in flag_rows()}
    assert REQUIRED <= stated, f"missing from the table: {sorted(REQUIRED - stated)}"


@pytest.mark.parametrize("flag, stage, default, paper", flag_rows())
def test_stated_default_is_the_parsers(flag, stage, default, paper):
    assert value(default) == parser_default(stage, flag), (flag, stage)


def test_the_stage_defaults_differ_where_the_page_says_so():
    """Stage 2's tau (the published code's 0.05) is not stage 4's (stage 2's record, else 0.03, the paper's): the
    reason the table exists; read from the parsers and stage 4's fallback, so a change of either default fails
    here until the page follows."""
    from utils.stages import stage4_tau
    assert parser_default(2, "--proportion_attribution_required") == 0.05
    assert parser_default(4, "--proportion_attribution_required") is None
    assert stage4_tau.PUBLISHED_TAU == 0.03


def paper_command():
    """The flags of the page's command for the paper's candidate list: {flag: value}."""
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if "get_cosine_similarities.py" in line and "--cos_sim_high" in line:
                words = shlex.split(line.split("#")[0])
                return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    raise AssertionError("docs/method.md has no get_cosine_similarities.py command with --cos_sim_high")


def test_paper_command_passes_the_papers_values():
    cmd = paper_command()
    stage2 = [(flag, paper) for flag, stage, _, paper in flag_rows() if stage == 2 and flag in
              ("--proportion_attribution_required", "--p", "--cos_sim_low", "--cos_sim_high")]
    assert len(stage2) == 4
    for flag, paper in stage2:
        assert flag in cmd and float(cmd[flag]) == float(value(paper)), flag


def constants():
    """{name: value cell} of the constants table."""
    return {row[0].strip("`"): row[1] for row in table("constant")}


def test_stated_constants_are_the_modules():
    from utils.method import clustering, rho_scores, split
    from utils.stages import label_free, stage3
    c = constants()
    rhos = [float(v) for v in c["RHOS"].strip("`").split(",")]
    assert rhos == split.RHOS
    assert value(c["TOLERANCE"]) == split.TOLERANCE
    assert value(c["EPS"]) == rho_scores.EPS
    assert value(c["N_INIT"]) == clustering.N_INIT
    assert value(c["SEED"]) == clustering.SEED
    assert tuple(int(v) for v in c["AUTO_KS"].strip("`").split(",")) == clustering.AUTO_KS
    assert value(c["POOL_FACTOR"]) == label_free.POOL_FACTOR
    assert value(c["CHUNK"]) == stage3.CHUNK
