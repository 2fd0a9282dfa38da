"""The parsed flags into each stage's settings: the one place, with the scripts, that reads them.

Each function takes the namespace of a stage script's parser (the flags of ``cli.add_model_args`` and
``utils/run/flags.py``) and returns that stage's frozen Settings, built by keyword; a flag that is bad or does not
fit the others raises UserError (one line) before anything is read or loaded. What a flag leaves to the store (its
folder, the data folder) is ``context.setup``'s ``Spec``: the scripts build the settings from the flags first (the
one-line errors come before the model loads), then ``resolved(settings, ctx.spec)`` after setup; the extras of
stage 4 are built from the flags and the spec at once (``feature_vis``, ``sae_view``).
"""
from dataclasses import fields, replace

from utils.concepts import by_classes
from utils.concepts.by_classes import MORE_CONCEPTS, triples_given
from utils.concepts.source import ConceptSource
from utils.data import folders
from utils.errors import UserError
from utils.featurevis import settings as fv_settings
from utils.run import cli
from utils.stages import label_free as label_free_stage, sae_view as sae_view_stage, stage1 as stage1_stage
from utils.stages import stage2 as stage2_stage, stage3 as stage3_stage, stage4 as stage4_stage


def stage1(args):
    """stage1.Settings of get_importances_for_classes.py's flags."""
    return stage1_stage.Settings(
        store_dir=args.store_dir, batch_size=args.batch_size, num_workers=args.num_workers,
        chunk_size=args.chunk_size, autocast_bf16=args.autocast_bf16, channels_last=args.channels_last,
        gpu_decode=args.gpu_decode, gpu_decoder=args.gpu_decoder, fast_resize=args.fast_resize,
        deterministic=args.deterministic, cpu_threads=args.cpu_threads, tf32=args.tf32,
        allow_mixed_numerics=args.allow_mixed_numerics, skip_unreadable=args.skip_unreadable)


def stage2(args):
    """stage2.Settings of get_cosine_similarities.py's flags (their ranges checked: ``stage2.check_bounds``)."""
    return stage2_stage.Settings(
        store_dir=args.store_dir, out_dir=args.out_dir, tau=args.proportion_attribution_required, p=args.p,
        low=args.cos_sim_low, high=args.cos_sim_high, sign=args.importance_sign, chunk_rows=args.chunk_rows,
        top=getattr(args, "top", None))


def label_free(args):
    """label_free.Settings of get_cosine_similarities.py --label_free's flags (--k checked here)."""
    return label_free_stage.Settings(
        store_dir=args.store_dir, channels=None if args.channels is None else tuple(args.channels),
        top_n=args.top_n, k=label_free_stage.parse_k(args.k), chunk_rows=args.chunk_rows)


def stage3(args):
    """stage3.Settings of disentangle_channel.py's flags; one-line errors for flags that do not fit together."""
    def clusters_alone(a):
        return "--clusters selects clusters of --concepts_file: give the file too" if a.clusters is not None else None
    source = concept_source(args, "--channel_disentangle", clusters_alone, "the channel whose clusters to use",
                            "splits")
    return stage3_stage.Settings(
        store_dir=args.store_dir, source=source, rho_score=args.rho_score, exactness_images=args.exactness_images,
        channels_last=not args.no_channels_last, export_model=args.export_model, batch_size=args.batch_size,
        num_workers=folders.default_workers(args.num_workers))


def stage4(args):
    """stage4.Settings of get_results.py's flags; UserError (one line) for a missing or bad one, before anything
    is read."""
    from utils.stages import feature_vis_shards
    cli.require(args, "model_dir")
    if feature_vis_shards.world_size() > 1 and not args.get_feature_vis:
        raise UserError("under torchrun, stage 4 shares out its feature visualizations (--get_feature_vis) "
                        "and nothing else: run it as one process without them")

    def file_flag_alone(a):
        flag = "--clusters" if a.clusters is not None else "--val_top_n" if a.val_top_n is not None else None
        return flag and f"{flag} goes with --concepts_file: give the file too"
    source = concept_source(args, "--channel_of_interest", file_flag_alone, "the channel whose clusters were used",
                            "evaluates")
    tau = args.proportion_attribution_required
    if tau is not None and not 0 <= tau <= 1:
        raise UserError(f"--proportion_attribution_required {tau}: tau is a share of the positive attribution, "
                        f"in [0, 1] (the paper's 0.03; 0 counts every image)")
    if args.top_k < 1:
        raise UserError("--top_k must be at least 1")
    if args.val_top_n is not None and args.val_top_n < 1:
        raise UserError("--val_top_n must be at least 1")
    return stage4_stage.Settings(
        model_dir=args.model_dir, data_dir=args.data_dir, source=source, val_top_n=args.val_top_n,
        rho="best" if args.f is None else args.f, tau=tau, qualitative=args.get_qualitative,
        quantitative=args.get_quantitative, top_images=args.get_top_images, top_k=args.top_k,
        top_images_all_val=args.top_images_all_val, unreadable="skip" if args.skip_unreadable else "error",
        out_dir=args.out_dir, batch_size=args.batch_size, num_workers=args.num_workers,
        atlas=atlas_dir(args.atlas))


def atlas_dir(folder):
    """--atlas: refused (one line) before any work where the folder holds anything but a previous atlas."""
    if folder is not None:
        from utils.atlas.write import check_atlas_dir
        check_atlas_dir(folder)
    return folder


def feature_vis(args, spec):
    """featurevis.settings.Settings of stage 4's --fv_* flags (each size flag given, else the preset's: paper
    without one) and the flags it shares; the training images and the store: ``spec``'s (``context.Spec``)."""
    preset = getattr(args, "fv_preset", None)
    size = {k: getattr(args, k) if getattr(args, k) is not None else fv_settings.PRESETS[preset or "paper"][k]
            for k in fv_settings.SIZE_FLAGS}
    return fv_settings.Settings(
        size=size["fv_size"], steps=size["fv_steps"], crops=size["fv_crops"], seed=args.fv_seed, lr=args.fv_lr,
        spectrum_images=size["fv_spectrum_images"], batch_size=args.batch_size, num_workers=args.num_workers,
        unreadable="skip" if args.skip_unreadable else "error", data_dir=spec.data_dir, store_dir=spec.store_dir,
        batch_targets=args.fv_batch_targets, preset=preset)


def sae_view(args, spec):
    """sae_view.Settings of stage 4's --sae_* flags and the flags it shares; the training images and the store:
    ``spec``'s (``context.Spec``)."""
    return sae_view_stage.Settings(
        **{k: getattr(args, k) for k in sae_view_stage.DEFAULTS}, batch_size=args.batch_size,
        num_workers=args.num_workers, data_dir=spec.data_dir, store_dir=spec.store_dir,
        unreadable="skip" if args.skip_unreadable else "error", top_k=args.top_k, all_val=args.top_images_all_val)


def resolved(settings, spec):
    """``settings`` with the folders ``context.setup`` resolved (``spec``): the store's (``store_dir`` /
    ``model_dir``: STORE/models_disentangled is STORE) and the data folder (the store's when not given)."""
    have = {f.name for f in fields(settings)}
    values = {"store_dir": spec.store_dir, "model_dir": spec.store_dir, "data_dir": spec.data_dir}
    return replace(settings, **{k: v for k, v in values.items() if k in have})


# ---------------------------------------------------------------------------- which concepts a command line gives

def concept_source(args, channel_flag, clusters_need_file, why_channel, verb):
    """The ConceptSource of stage 3's or 4's flags: ``--candidates`` (read with the store), ``--concepts_file``
    (read once the model is known), or classes (``--triples``, or the per-triple flags with
    ``--classes_for_concept3..6``, parsed here), the same rules for both stages.

    channel_flag: the stage's channel flag (``--channel_disentangle``, ``--channel_of_interest``);
    clusters_need_file(args): the one-line message for a flag that goes only with --concepts_file, or None;
    why_channel: what the channel is for, in the message for --concepts_file without it; verb: what the stage
    does with a line of --triples ("splits", "evaluates")."""
    check_candidates_flags(args, channel_flag)
    channel = getattr(args, channel_flag[2:])
    if args.candidates is not None:
        return ConceptSource(candidates=args.candidates, top=args.top, all_classes=args.all_classes)
    clusters = None if args.clusters is None else tuple(args.clusters)
    if args.concepts_file is not None:
        check_no_classes_with_file(args)
        if channel is None:
            raise UserError(f"--concepts_file needs {channel_flag} ({why_channel})")
        return ConceptSource(channel=channel, concepts_file=args.concepts_file, clusters=clusters)
    message = clusters_need_file(args)
    if message:
        raise UserError(message)
    return ConceptSource(channel=channel, triples=tuple(class_jobs(args, channel, channel_flag, verb)),
                         triples_file=args.triples)


def check_candidates_flags(args, channel_flag):
    """Refuse --top / --all_classes without --candidates, and --candidates beside the flags giving concepts."""
    if args.candidates is None:
        for flag, given in (("--all_classes", args.all_classes), ("--top", args.top is not None)):
            if given:
                raise UserError(f"{flag} goes with --candidates: give the file too")
        return
    values = {"triples": args.triples, "channel": getattr(args, channel_flag[2:]),
              "classes_for_concept1": args.classes_for_concept1, "classes_for_concept2": args.classes_for_concept2,
              "concepts_file": args.concepts_file, "clusters": args.clusters}
    values.update({f"classes_for_concept{j}": getattr(args, f"classes_for_concept{j}") for j in MORE_CONCEPTS})
    clash = [(channel_flag if k == "channel" else f"--{k}") for k, v in values.items() if v is not None]
    if clash:
        raise UserError(f"--candidates gives the channels and concepts: drop {', '.join(clash)}")
    if args.top is not None and args.top < 1:
        raise UserError(f"--top {args.top}: give at least 1 channel")


def more_concepts_given(args):
    """The raw values of --classes_for_concept3..6 (None where not given) and the numbers of those given."""
    more = [getattr(args, f"classes_for_concept{j}") for j in MORE_CONCEPTS]
    return more, [j for j, m in zip(MORE_CONCEPTS, more) if m is not None]


def check_no_classes_with_file(args):
    """--concepts_file gives the concepts: refuse --triples and every --classes_for_concept flag beside it."""
    _, given_more = more_concepts_given(args)
    clash = [f for f, v in (("--triples", args.triples), ("--classes_for_concept1", args.classes_for_concept1),
                            ("--classes_for_concept2", args.classes_for_concept2)) if v is not None]
    clash += [f"--classes_for_concept{j}" for j in given_more]
    if clash:
        raise UserError(f"--concepts_file gives the concepts: drop {', '.join(clash)}")


def class_jobs(args, channel, channel_flag, verb):
    """The Triples of the command line: --triples, or the per-triple flags with --classes_for_concept3..6
    (numbered without gaps); ``verb`` says what the stage does with a line of --triples ("splits", "evaluates")."""
    more, given_more = more_concepts_given(args)
    if given_more and args.triples is not None:
        raise UserError(f"--triples {verb} two concepts per line: --classes_for_concept{given_more[0]} "
                        f"needs the per-triple flags")
    triples = triples_given(args.triples, channel, args.classes_for_concept1, args.classes_for_concept2,
                                channel_flag)
    if given_more:
        if given_more != list(MORE_CONCEPTS[:len(given_more)]):
            missing = next(j for j in MORE_CONCEPTS if j not in given_more)
            raise UserError(f"--classes_for_concept{given_more[-1]} without --classes_for_concept{missing}: "
                            f"number the concepts 1, 2, 3, ... without gaps")
        triples[0].more = [by_classes.parse_classes(m, f"--classes_for_concept{j}")
                           for j, m in zip(MORE_CONCEPTS, more) if m is not None]
    return triples
