"""README.md and docs/*.md against the code: links and pictures resolve, every flag a command names exists in
the parser of the script it is given to, and docs/reference.md is what docs/make_reference.py writes today.

The flag rule. A command is a logical line of a fenced code block (backslash continuations joined, `#`
comments dropped, split at `;`, `&&`, `||`, `|`) or an inline code span. When it names one of the scripts
of SCRIPTS (a stage script, a call script, `demo.sh`, a demo or benchmark module, named by its path or, after
`python -m`, by its module name), every `--flag` after
that name must be in the script's parser (a call script's and demo.sh's flags go to the stage script or
demo module they call). Besides, every inline code span that starts with `--` (a flag named in prose)
must be a flag of one of those parsers. Parsers come from the stage scripts' build_parser(), and for the
demo and benchmark modules from their main() / parse_args() stopped at parse_args, so nothing runs. Not
checked: flags of other programs (pip, torchrun, pytest) and flags in plain prose outside code.
"""
import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


# name in a command -> how to get its parser: ("stage", module) | ("main", module) | ("file", path)
SCRIPTS = {
    "get_importances_for_classes.py": ("stage", "get_importances_for_classes"),
    "get_cosine_similarities.py": ("stage", "get_cosine_similarities"),
    "disentangle_channel.py": ("stage", "disentangle_channel"),
    "get_results.py": ("stage", "get_results"),
    "disentanglement_calls.sh": ("stage", "disentangle_channel"),
    "quantitative_evaluation_calls.sh": ("stage", "get_results"),
    "demo.sh": ("argv", "demo.run_demo"),  # plus --data and, with --data fashion_mnist, demo.run_fashion's
    "demo.run_demo": ("argv", "demo.run_demo"),
    "demo.docs_pictures": ("argv", "demo.docs_pictures"),
    "demo.atlas_pictures": ("argv", "demo.atlas_pictures"),
    "demo.run_fashion": ("argv", "demo.run_fashion"),
    "demo.fashion_model": ("argv", "demo.fashion_model"),
    "demo.fashion_mnist": ("argv", "demo.fashion_mnist"),
    "demo.fashion_pictures": ("argv", "demo.fashion_pictures"),
}
for _path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.py"), recursive=True)):
    if os.path.basename(_path) not in ("__init__.py", "workload.py", "measure.py", "published_code.py",
                                       "purity_scores.py"):  # modules the benchmarks import, no command lines
        _rel = os.path.relpath(_path, ROOT).replace(os.sep, "/")
        SCRIPTS[_rel] = SCRIPTS[_rel[:-3].replace("/", ".")] = ("file", _path)  # path, or python -m name


# ------------------------------------------------------------------------------------------ parsers

class _Parser(Exception):
    """Carries the parser whose parse_args was called."""


def _stopped_at_parse_args(call):
    """The parser whose parse_args (or parse_known_args) ``call()`` calls first; nothing after it runs."""
    originals = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def stop(self, *args, **kwargs):
        raise _Parser(self)
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = stop
    try:
        call()
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = originals
    raise AssertionError(f"{call} returned without calling parse_args")


_cache = {}


def parser_of(script):
    """The argparse parser of a name in SCRIPTS."""
    kind, target = SCRIPTS[script]
    key = (kind, target)
    if key not in _cache:
        if kind == "stage":
            _cache[key] = importlib.import_module(target).build_parser()
        elif kind == "argv":
            module = importlib.import_module(target)
            entry = getattr(module, "parse_args", None) or module.main
            _cache[key] = _stopped_at_parse_args(lambda: entry([]))
        else:
            spec = importlib.util.spec_from_file_location("_docs_" + os.path.basename(target)[:-3], target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # the scripts run main() only under __main__
            _cache[key] = _stopped_at_parse_args(module.main)
    return _cache[key]


def flags_of(script):
    if script == "demo.sh":  # its own --data, then the flags of the runner it calls
        return {"--data"} | _parser_flags("demo.sh") | _parser_flags("demo.run_fashion")
    return _parser_flags(script)


def _parser_flags(script):
    return {o for a in parser_of(script)._actions for o in a.option_strings if o.startswith("--")}


def all_flags():
    flags = set()
    for script in SCRIPTS:
        flags |= flags_of(script)
    return flags


# ------------------------------------------------------------------------------------------ markdown

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)


def rel(path):
    return os.path.relpath(path, ROOT).replace(os.sep, "/")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    return FENCE.findall(text)


def prose(text):
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters of any script, digits, '_' and
    '-' kept), spaces to hyphens."""
    h = re.sub(r"`|\*\*?|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(path):
    return {slug(h) for h in HEADING.findall(prose(read(path)))}


def commands(text):
    """(command text, where) pairs: the logical lines of code blocks and the inline code spans."""
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").split("\n"):
            line = re.sub(r"(^|\s)#.*$", "", line)
            for part in re.split(r"\s(?:&&|\|\||;|\|)\s|;\s*$", line):
                if part.strip():
                    yield part.strip(), "code block"
    for span in INLINE.findall(prose(text)):
        yield span, "inline code"


def tokens(command):
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def script_flags(command):
    """(script, [--flags after it]) for each script of SCRIPTS that the command names."""
    found = []
    current = None
    for tok in tokens(command):
        name = next((s for s in SCRIPTS if tok == s or tok.endswith("/" + s)), None)
        if name is None and tok in SCRIPTS:
            name = tok
        if name is not None:
            current = (name, [])
            found.append(current)
        elif current is not None and tok.startswith("--"):
            current[1].append(tok.split("=", 1)[0])
    return found


# ------------------------------------------------------------------------------------------ tests

def test_pages_found():
    names = {rel(p) for p in PAGES}
    assert {"README.md", "docs/method.md", "docs/reference.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_and_pictures_resolve(page):
    text = prose(read(page))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{target}: no heading with anchor #{anchor} in {rel(full)}")
    assert not bad, f"{rel(page)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_flags_exist_in_their_scripts(page):
    text = read(page)
    known = all_flags()
    bad = []
    for command, where in commands(text):
        for script, flags in script_flags(command):
            accepted = flags_of(script)
            for flag in flags:
                if flag not in accepted:
                    bad.append(f"{script} has no {flag} ({where}: {command[:80]})")
        if where == "inline code" and command.startswith("--"):
            for flag in (t.split("=", 1)[0] for t in tokens(command) if t.startswith("--")):
                if flag not in known:
                    bad.append(f"no script has {flag} (inline code: {command[:80]})")
    assert not bad, f"{rel(page)}:\n" + "\n".join(bad)


def test_the_flag_rule_catches_a_wrong_flag():
    """The rule itself, on made-up commands with a known answer."""
    text = ("```bash\npython get_results.py --model_dir S \\\n    --no_such_flag 1  # --ignored\n"
            "bash disentanglement_calls.sh DATA STORE --model m && python disentangle_channel.py --triples t\n```\n"
            "and `get_cosine_similarities.py --label_free --k 3`\n")
    found = [(s, f) for c, _ in commands(text) for s, f in script_flags(c)]
    assert found == [("get_results.py", ["--model_dir", "--no_such_flag"]),
                     ("disentanglement_calls.sh", ["--model"]),
                     ("disentangle_channel.py", ["--triples"]),
                     ("get_cosine_similarities.py", ["--label_free", "--k"])]
    assert "--no_such_flag" not in flags_of("get_results.py")
    assert {"--model_dir", "--label_free", "--k", "--triples", "--model"} <= all_flags()


def test_parsers_of_demo_and_benchmarks_are_read():
    assert {"--seed", "--arch", "--train_threads", "--aux_weight"} <= flags_of("demo.sh")
    assert {"--images", "--bf16"} <= flags_of("benchmarks/stage1_throughput.py")
    assert {"--classes", "--resize", "--crop", "--no_naive"} <= flags_of("benchmarks.run_all")
    assert {"--classes", "--workdir"} <= flags_of("benchmarks.bench_stage3")
    assert {"--workdir", "--device"} <= flags_of("benchmarks.studies.bf16_effect")


def test_slug_is_githubs():
    assert slug("Choosing ρ") == "choosing-ρ"
    assert slug("The demo's pictures") == "the-demos-pictures"
    assert slug("Stage 1 on the GPU: decoding and overlap") == "stage-1-on-the-gpu-decoding-and-overlap"
    assert slug("`get_results.py`") == "get_resultspy"



def test_reference_page_is_up_to_date():
    spec = importlib.util.spec_from_file_location("_make_reference", os.path.join(ROOT, "docs", "make_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert read(os.path.join(ROOT, "docs", "reference.md")) == module.render(), \
        "docs/reference.md is stale: run .venv/bin/python docs/make_reference.py"


def test_no_outside_documents_cited():
    """The pages explain the method themselves; they cite no document that is not in the repository."""
    for page in PAGES:
        assert not re.search(r"\bSPEC\b", read(page)), rel(page)
