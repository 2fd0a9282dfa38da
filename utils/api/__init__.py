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
Hidden files (locks, temporary files) are not listed. (The names of stage 3's and 4's files depend on what
the stage resolves from the store and on the jobs it skips, so the folders are listed rather than the names
rebuilt.) Like the scripts, this package reads the parsed flags; nothing else outside ``utils/run/`` does.
See docs/python.md.
"""
from utils.api.calls import atlas, cosine_similarities, disentangle, importances, results, run
from utils.api.keywords import SCRIPTS, argv_of, flags, parse
from utils.api.result import BEST_CHECKPOINT, RECORDS, Result, record_kind
from utils.api.written import snapshot, written, written_folders
from utils.errors import UserError

__all__ = ["importances", "cosine_similarities", "disentangle", "results", "atlas", "run", "flags", "Result",
           "UserError"]
