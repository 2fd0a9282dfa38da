"""Stage 4's tau when ``--proportion_attribution_required`` is not given: stage 2's, from its record.

Stage 4 counts a val image for a concept where its relative attribution to the channel is at least tau, the
same share that stage 2 used to call a channel important for an image (with p, the share of a class's images).
A layer whose candidates came from tau = 0.01 would find few or no val images at the published 0.03, so stage 4
takes tau (and reports p) from stage 2's record, in this order:

1. ``--proportion_attribution_required`` given: that value, nothing printed (the files as before this rule);
2. ``--candidates FILE``, stage 2's candidates file: the tau and p it records;
3. the store's stage-2 candidates files (``STORE/results_get_cosine_similarities/*_candidates.json``) of this
   model and layer: their tau where they all agree;
4. else the published 0.03 (the paper's quantitative tau), with the reason (no record, or records that
   disagree: then the flag is needed to choose).

Every case but the first prints one line: the tau used and where it comes from.
"""
import glob
import json

from utils.files import names

PUBLISHED_TAU = 0.03


def _record(path):
    """(tau, p) of a stage-2 candidates file, or None where it is not one (or cannot be read)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list):
        return None
    tau = doc.get("proportion_attribution_required")
    return None if not isinstance(tau, (int, float)) else (float(tau), doc.get("p"), doc)


def stage2_records(store_dir, model_spec, layer):
    """{path: (tau, p)} of the store's stage-2 candidates files made for ``model_spec`` and ``layer``."""
    out = {}
    for path in sorted(glob.glob(names.candidates_json(glob.escape(store_dir), "*"))):
        rec = _record(path)
        if rec is not None and rec[2].get("model") == model_spec and rec[2].get("layer") == layer:
            out[path] = rec[:2]
    return out


def choose(given, candidates_path, records):
    """(tau, the line saying where it comes from, or None when it was given). given: the flag's value or None;
    candidates_path: --candidates or None; records: ``stage2_records``'s dict."""
    if given is not None:
        return given, None
    rec = _record(candidates_path) if candidates_path is not None else None
    if rec is not None:
        return rec[0], f"tau={rec[0]} (p={rec[1]}) from stage 2's record {candidates_path}"
    taus = sorted({t for t, _ in records.values()})
    if len(taus) == 1:
        (path, (tau, p)), more = next(iter(records.items())), len(records) - 1
        also = f" (and {more} more record{'s' if more != 1 else ''} with the same tau)" if more else ""
        return tau, f"tau={tau} (p={p}) from stage 2's record {path}{also}"
    if taus:
        return PUBLISHED_TAU, (f"tau={PUBLISHED_TAU}, the published default: stage 2's records disagree (tau "
                               f"{', '.join(map(str, taus))}); pass --proportion_attribution_required to choose")
    return PUBLISHED_TAU, f"tau={PUBLISHED_TAU}, the published default (no stage-2 record of this layer in the store)"


def resolve(ctx, settings, quiet=False):
    """``settings`` (stage4.Settings) with its tau decided as above; prints where it comes from (unless
    ``quiet``: another torchrun process)."""
    from dataclasses import replace
    records = {} if settings.tau is not None or settings.source.candidates is not None else \
        stage2_records(settings.model_dir, ctx.model_spec, ctx.layer_path)
    tau, line = choose(settings.tau, settings.source.candidates, records)
    if line and not quiet:
        print(f"stage 4 counts val images with relative attribution >= {line}")
    return replace(settings, tau=tau)
