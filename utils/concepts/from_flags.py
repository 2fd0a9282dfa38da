"""Which concepts a stage's command line gives: ``--candidates`` (read with the store), ``--concepts_file``
(read once the model is known), or classes (``--triples``, or the per-triple flags with
``--classes_for_concept3..6``), the same rules for stages 3 and 4."""
from utils.concepts import candidates
from utils.concepts.by_classes import check_no_classes_with_file, class_jobs
from utils.errors import UserError


def class_jobs_of_flags(args, channel_flag, clusters_need_file, why_channel, verb):
    """The Triples of the command line, or None where --candidates or --concepts_file gives the concepts.

    channel_flag: the stage's channel flag (``--channel_disentangle``, ``--channel_of_interest``);
    clusters_need_file(args): the one-line message for a flag that goes only with --concepts_file, or None;
    why_channel: what the channel is for, in the message for --concepts_file without it; verb: what the stage
    does with a line of --triples ("splits", "evaluates")."""
    candidates.check_flags(args, channel_flag)
    if args.candidates is not None:
        return None
    channel = getattr(args, channel_flag[2:])
    if args.concepts_file is not None:
        check_no_classes_with_file(args)
        if channel is None:
            raise UserError(f"--concepts_file needs {channel_flag} ({why_channel})")
        return None
    message = clusters_need_file(args)
    if message:
        raise UserError(message)
    return class_jobs(args, channel, channel_flag, verb)
