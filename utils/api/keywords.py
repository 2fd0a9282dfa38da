"""Keyword arguments to a stage's parsed flags, through the script's own ``build_parser()``: ``flag=value`` is
``--flag=value``, a switch takes True or False, a flag of several values a list (or one value), None its
default; a keyword that is no flag raises UserError with the flags whose names are close (difflib)."""
import difflib
import importlib
import os

from utils.errors import UserError

# verb -> (the module whose build_parser() and main(args) it runs, the script as a command line names it)
SCRIPTS = {
    "importances": ("get_importances_for_classes", "get_importances_for_classes.py"),
    "cosine_similarities": ("get_cosine_similarities", "get_cosine_similarities.py"),
    "disentangle": ("disentangle_channel", "disentangle_channel.py"),
    "results": ("get_results", "get_results.py"),
    "atlas": ("utils.atlas.__main__", "-m utils.atlas"),
}


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


def argv_of(stage, parser, given):
    """The command-line words of the keywords ``given``; UserError for a keyword that is no flag or a value of the wrong
    form. ``None`` leaves a flag out (its default), a switch takes True or False, a flag of several values a
    list (or one value)."""
    known = keywords(parser)
    argv, dests = [], {}
    for key, value in given.items():
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
