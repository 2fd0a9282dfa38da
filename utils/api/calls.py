"""One call per stage script: ``importances``, ``cosine_similarities``, ``disentangle``, ``results`` and
``atlas`` run the script's ``main(args)`` on the flags of their keywords and return a ``Result``."""
from utils.api.keywords import SCRIPTS, parse
from utils.api.result import Result
from utils.api.written import read_records, snapshot, written, written_folders
from utils.errors import UserError


def run(stage, **kwargs):
    """Run a verb's script with ``kwargs`` as its flags; returns a ``Result``."""
    if stage not in SCRIPTS:
        raise UserError(f"no stage {stage!r}; one of {', '.join(SCRIPTS)}")
    module, args, argv = parse(stage, **kwargs)
    script = SCRIPTS[stage][1]
    command = ("python", *script.split(), *argv)
    folders = [] if getattr(args, "list_layers", False) else written_folders(stage, vars(args))
    before = snapshot(folders)
    value = module.main(args)
    files = written(before, snapshot(folders + written_folders(stage, vars(args))))
    return Result(stage=stage, command=command, files=files, records=read_records(files), value=value)


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
