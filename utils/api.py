"""The stages from Python (a notebook): one call per stage, keyword arguments that mirror the script's flags.

    from utils import api
    r1 = api.importances(data_dir="data", store_dir="store", model="demo.model:shapes_cnn", weights="model.pth")
    r2 = api.cosine_similarities(store_dir="store", out_dir="out", p=0.5)
    r2.candidates[0]  # {'channel': ..., 'class1': ..., 'class2': ..., 'cosine_similarity': ...}

Each call builds the stage's parsed flags from its keywords through the script's own ``build_parser()``
(``--flag VALUE`` for ``flag=VALUE``; ``flag=True`` for a switch; a list for a flag of several values), so
the defaults, the checks and docs/reference.md are the script's; it then runs the script's ``main(args)``.
A keyword that is no flag of the script, or a value the flag refuses, raises ``UserError`` (one line, with
the flags whose names are close), as do the stage's own checks; nothing raises ``SystemExit``.

It returns a frozen ``Result``: the equivalent command line, the files the call wrote and the records among
them, parsed. The files are found by comparing the folders the stage writes into (named by
utils/files/names.py; not the whole store or output folder) before and after the call: every file that is
new or was replaced (another inode, time or size). A rerun that finds its work done (a finished store, a
checkpoint already written by an earlier ``--candidates`` run) writes nothing, and returns no files for it.
Hidden files (locks, temporary files) are not listed. See docs/python.md.
"""
import difflib
import fnmatch
import importlib
import json
import os
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType

from utils.files import names
from utils.run.cli import UserError

# verb -> (the stage script's module, its file name, how that file is run)
SCRIPTS = {
    "importances": ("get_importances_for_classes", "get_importances_for_classes.py"),
    "cosine_similarities": ("get_cosine_similarities", "get_cosine_similarities.py"),
    "disentangle": ("disentangle_channel", "disentangle_channel.py"),
    "results": ("get_results", "get_results.py"),
    "atlas": ("utils.atlas.__main__", "-m utils.atlas"),
}

# the records a call returns parsed: kind -> pattern of the file's base name (from names.py's own functions)
# (the first that fits; the suffixes first: a run or model name may hold ``_concepts_top``)
RECORDS = {
    "manifest": names.MANIFEST,
    "atlas": names.ATLAS_RECORD,
    "summary": "*" + os.path.basename(names.summary("", "")),
    "info": "*" + os.path.basename(names.info_file("_f")),
    "candidates": "*" + os.path.basename(names.candidates_json("", "")),
    "concepts": os.path.basename(names.concepts_file("", "*", "*")),
}
BEST_CHECKPOINT = f"_f{names.rho_text(names.BEST)}{names.CHECKPOINT_SUFFIX}"  # a split's best-rho checkpoint


def record_kind(path):
    """Which record a written file is (a key of ``RECORDS``), or None."""
    base = os.path.basename(path)
    return next((kind for kind, pattern in RECORDS.items() if fnmatch.fnmatchcase(base, pattern)), None)


@dataclass(frozen=True)
class Result:
    """What one call wrote.

    ``stage``: the verb (``importances`` ...); ``command``: the equivalent command line as a tuple of words
    (``python``, the script, its flags; ``command_line`` joins it for a shell); ``files``: absolute paths of
    every file the call wrote, sorted; ``records``: {path: parsed JSON} of the written records (the store's
    manifest, stage 2's candidates or concepts file, stage 3's ``…_info.json``, stage 4's ``…_summary.json``,
    the atlas's ``atlas.json``); ``value``: what ``main`` returned (``--list_layers``: 0).
    """
    stage: str
    command: tuple
    files: tuple = ()
    records: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    value: object = None

    @property
    def command_line(self):
        return shlex.join(self.command)

    def of_kind(self, kind):
        """The parsed records of one kind (a key of ``RECORDS``), in path order."""
        return [rec for path, rec in sorted(self.records.items()) if record_kind(path) == kind]

    def _one(self, kind):
        found = self.of_kind(kind)
        if not found:
            raise ValueError(f"this {self.stage} call wrote no {kind} record (.files lists what it wrote)")
        if len(found) > 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} {kind} records: .of_kind({kind!r}) "
                             f"lists them")
        return found[0]

    @property
    def manifest(self):
        """Stage 1: the store's manifest.json."""
        return self._one("manifest")

    @property
    def candidates(self):
        """Stage 2: the candidates (dicts channel, class1, class2, cosine_similarity), as in the file."""
        return self._one("candidates")["candidates"]

    @property
    def candidates_file(self):
        """Stage 2: the path of the ``…_candidates.json`` written (stage 3's and 4's ``candidates=``)."""
        return self._path("candidates")

    @property
    def concepts(self):
        """Stage 2 with ``label_free=True``: the concepts file."""
        return self._one("concepts")

    @property
    def info(self):
        """Stage 3 (one split): its ``…_info.json``."""
        return self._one("info")

    @property
    def infos(self):
        """Stage 3: every ``…_info.json`` the call wrote."""
        return self.of_kind("info")

    @property
    def best_checkpoint(self):
        """Stage 3 (one split): the path of its ``…_f_best_unnormalized.pth`` (``load_disentangled_model``'s
        checkpoint)."""
        found = [p for p in self.files if p.endswith(BEST_CHECKPOINT)]
        if len(found) != 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} best-rho checkpoints (.files lists them)")
        return found[0]

    @property
    def summary(self):
        """Stage 4 (one run): its ``…_summary.json``."""
        return self._one("summary")

    @property
    def summaries(self):
        """Stage 4: every ``…_summary.json`` the call wrote."""
        return self.of_kind("summary")

    @property
    def atlas(self):
        """The atlas's ``atlas.json`` (``atlas()``, or ``results(..., atlas=FOLDER)``)."""
        return self._one("atlas")

    def _path(self, kind):
        found = [p for p in self.records if record_kind(p) == kind]
        if len(found) != 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} {kind} records")
        return found[0]


# ------------------------------------------------------------------------------------------------ flags
def _raise(message):
    raise UserError(message)


def build_parser(stage):
    """The parser of the stage's script, whose errors raise UserError (instead of exiting)."""
    module = importlib.import_module(SCRIPTS[stage][0])
    parser = module.build_parser()
    parser.error = lambda message: _raise(f"{stage}: {message}")
    return module, parser


def keywords(parser):
    """{keyword: argparse action}: every long flag of ``parser`` without its ``--`` (aliases included)."""
    return {opt[2:]: action for opt, action in parser._option_string_actions.items()
            if opt.startswith("--") and opt != "--help"}


def flags(stage):
    """{keyword: help text} of a verb (``"importances"`` ...): the flags its keywords mirror."""
    _, parser = build_parser(stage)
    return {k: a.help for k, a in keywords(parser).items()}


def _text(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def argv_of(stage, parser, kwargs):
    """The command-line words of ``kwargs``; UserError for a keyword that is no flag or a value of the wrong
    form. ``None`` leaves a flag out (its default), a switch takes True or False, a flag of several values a
    list (or one value)."""
    known = keywords(parser)
    argv, dests = [], {}
    for key, value in kwargs.items():
        action = known.get(key)
        if action is None:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; api.flags({stage!r}) lists them"
            raise UserError(f"{stage}: no keyword {key!r} (the keywords are {SCRIPTS[stage][1]}'s flags){hint}")
        if action.dest in dests:
            raise UserError(f"{stage}: {dests[action.dest]}= and {key}= are the same flag; give one of them")
        dests[action.dest] = key
        if value is None:
            continue
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise UserError(f"{stage}: {key}={value!r}: a switch takes True or False")
            argv += [f"--{key}"] if value else []
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            argv += [f"--{key}", *map(_text, values)]
        elif isinstance(value, (list, tuple, set, dict)):
            raise UserError(f"{stage}: {key}={value!r}: the flag takes one value")
        else:
            argv.append(f"--{key}={_text(value)}")  # '=': a value that starts with '-' stays a value
    return argv


def parse(stage, **kwargs):
    """(the script's module, its parsed flags, the command-line words) of ``kwargs``."""
    module, parser = build_parser(stage)
    argv = argv_of(stage, parser, kwargs)
    return module, parser.parse_args(argv), argv


# ------------------------------------------------------------------------------------------------ files
def _subfolders(folder, keep):
    try:
        return [os.path.join(folder, e) for e in sorted(os.listdir(folder)) if keep(e)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def written_folders(stage, args):
    """The folders a stage writes into, named by utils/files/names.py (listed anew before and after a call)."""
    if stage == "importances":
        return _subfolders(args.store_dir, names.is_store_folder_name) if args.store_dir else []
    if stage == "cosine_similarities":
        return [names.stage2_dir(args.store_dir), names.stage2_dir(args.out_dir)] if args.store_dir else []
    if stage == "disentangle":
        return [names.checkpoints_dir(args.store_dir)] if args.store_dir else []
    if stage == "atlas":
        return [args.atlas]
    out = [os.path.dirname(names.plot(args.out_dir, "x")), os.path.dirname(names.result(args.out_dir, "x")),
           names.quantitative_dir(args.out_dir)]
    if args.model_dir:  # the caches of the feature visualizations and the SAE view
        stores = [args.model_dir]
        if os.path.basename(os.path.normpath(args.model_dir)) == names.CHECKPOINTS_DIR:
            stores.append(os.path.dirname(os.path.normpath(args.model_dir)))
        for s in stores:
            out += [os.path.dirname(names.spectrum_cache(s, 0, "x")), os.path.dirname(names.sae_cache(s, "x"))]
    return out + ([args.atlas] if args.atlas else [])


def snapshot(folders):
    """{absolute path: (inode, mtime_ns, size)} of every file below ``folders`` (hidden names left out)."""
    out = {}
    for top in folders:
        for d, dirs, files in os.walk(top):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            for f in files:
                if not f.startswith("."):
                    p = os.path.abspath(os.path.join(d, f))
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def written(before, after):
    """Paths of ``after`` that are new or changed against ``before`` (``snapshot``'s), sorted."""
    return tuple(sorted(p for p, sig in after.items() if before.get(p) != sig))


def _read_records(files):
    out = {}
    for p in files:
        if record_kind(p) is not None:
            with open(p) as f:
                out[p] = json.load(f)
    return MappingProxyType(out)


# ------------------------------------------------------------------------------------------------ the calls
def run(stage, **kwargs):
    """Run a verb's script with ``kwargs`` as its flags; returns a ``Result``."""
    if stage not in SCRIPTS:
        raise UserError(f"no stage {stage!r}; one of {', '.join(SCRIPTS)}")
    module, args, argv = parse(stage, **kwargs)
    script = SCRIPTS[stage][1]
    command = ("python", *script.split(), *argv)
    folders = [] if getattr(args, "list_layers", False) else written_folders(stage, args)
    before = snapshot(folders)
    value = module.main(args)
    files = written(before, snapshot(folders + written_folders(stage, args)))
    return Result(stage=stage, command=command, files=files, records=_read_records(files), value=value)


def importances(**flags):
    """Stage 1 (get_importances_for_classes.py): the store. Keywords: its flags (docs/reference.md),
    e.g. ``data_dir``, ``store_dir``, ``model``, ``weights``, ``layer_of_interest``. ``.manifest``: the store's
    manifest."""
    return run("importances", **flags)


def cosine_similarities(**flags):
    """Stage 2 (get_cosine_similarities.py): the candidates. Keywords: its flags, e.g. ``store_dir``,
    ``out_dir``, ``proportion_attribution_required``, ``p``, ``cos_sim_low``, ``cos_sim_high``, ``label_free``.
    ``.candidates``: the candidates list; ``.candidates_file``: its path; ``.concepts``: the label-free file."""
    return run("cosine_similarities", **flags)


def disentangle(**flags):
    """Stage 3 (disentangle_channel.py): the split channels' checkpoints. Keywords: its flags, e.g.
    ``store_dir``, ``channel_disentangle``, ``classes_for_concept1``, ``classes_for_concept2``, ``candidates``,
    ``top``, ``export_model``. ``.info`` (one split) or ``.infos``: the ``…_info.json`` records."""
    return run("disentangle", **flags)


def results(**flags):
    """Stage 4 (get_results.py): the evaluation. Keywords: its flags, e.g. ``model_dir``, ``out_dir``,
    ``channel_of_interest``, ``classes_for_concept1``, ``get_quantitative``, ``atlas``. ``.summary`` (one run)
    or ``.summaries``: the ``…_summary.json`` records."""
    return run("results", **flags)


def atlas(**flags):
    """The atlas of stage 4's runs (``python -m utils.atlas``). Keywords: ``results`` (stage 4's out_dir),
    ``store``, ``atlas`` (the folder to write), ``runs``, ``candidates``. ``.atlas``: its atlas.json."""
    return run("atlas", **flags)


__all__ = ["importances", "cosine_similarities", "disentangle", "results", "atlas", "flags", "Result", "UserError"]
