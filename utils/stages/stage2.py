"""Stage 2: the gamma-polysemantic candidates (channel, class1, class2) of a store, without any model pass.

From the store: the class histograms H[y, c] (how many images of class y find channel c important), the
classes each channel uses (H[y, c] >= p N_y), the class means of the patch sums, and for every channel the
cosine of the closed-form ARVs of each pair of its classes; the pairs with low <= cosine < high are the
candidates (``--top N``: the N pairs of lowest cosine, whatever the window; fewer than 5 candidates: the
advice of ``stage2_advice``, the layer at other tau and p). ``--importance_sign positive_activation`` counts an image for a channel only where the channel's
summed activation after the BatchNorm that follows the layer is positive, and reports what that changes.
Writes the published table under ``--out_dir`` and the candidates and histograms in the store folder
(names: utils/files/names.py).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.files import atomic, names, store
from utils.method import similarities
from utils.model import loading
from utils.report import tables
from utils.stages import stage2_passes, stage2_advice
from utils.errors import UserError


def check_bounds(tau, pp, low, high):
    """Refuse thresholds outside their range (UserError, one line each): tau and p in (0, 1], -1 <= low < high <= 1."""
    if not 0 < tau <= 1:
        raise UserError(f"--proportion_attribution_required {tau}: tau is a share of the positive attribution, "
                            f"in (0, 1] (the paper's 0.03 or 0.05)")
    if not 0 < pp <= 1:
        raise UserError(f"--p {pp}: p is a share of a class's images, in (0, 1] (e.g. 0.75, not 75)")
    if not -1 <= low < high <= 1:
        raise UserError(f"--cos_sim_low {low} --cos_sim_high {high}: a cosine lies in [-1, 1] and the range "
                            f"needs -1 <= low < high <= 1")


@dataclass(frozen=True)
class Settings:
    """Stage 2's settings: tau, p, the cosine range [low, high), the importance rule, where to write, chunking
    (the flags' defaults: ``utils/run/flags.py``'s ``stage2`` takes them from here). The ranges are checked on
    construction (``check_bounds``: one line each)."""
    store_dir: str
    out_dir: str = "."
    tau: float = 0.05
    p: float = 0.75
    low: float = 0.0
    high: float = 1.0
    sign: str = "published"
    chunk_rows: int = similarities.DEFAULT_CHUNK_ROWS
    top: int = None  # --top N: the N pairs of lowest cosine, the window ignored

    def __post_init__(self):
        check_bounds(self.tau, self.p, self.low, self.high)


@dataclass
class Result:
    """What stage 2 finds: the class names, N_y (K,), H[y, c] (K, C), the used classes (K, C) bool, the candidates
    (dicts, highest cosine first) and, under positive_activation, the sign report (else empty)."""
    class_names: list
    counts: torch.Tensor
    hist: torch.Tensor = None
    used: torch.Tensor = None
    cands: list = None
    sign_report: dict = field(default_factory=dict)


def run(ctx, s):
    """Stage 2 on the store of ``ctx`` (utils.run.context.Context) with Settings ``s``: candidates printed and
    written."""
    st = store.Store.open(ctx.spec.store_folder, ctx.fingerprint)  # the folder context.setup found
    A, targets, P = st.array("attributions"), st.labels(), st.array("patch_sums")
    unreadable = st.unreadable_rows()
    if len(unreadable):
        print(f"{len(unreadable)} unreadable training images recorded by stage 1 are left out of every count")
    k = len(st.manifest["classes"])
    r = Result(st.manifest["classes"], similarities.class_counts(targets, k))
    if s.sign == "published":
        r.hist = stage2_passes.class_histogram(A, targets, k, s.tau, s.chunk_rows, progress=True)
    else:
        r.hist, r.sign_report = positive_activation_histogram(ctx, s, (A, targets, P), r.counts)
    r.used = similarities.used_classes(r.hist, r.counts, s.p)
    means = stage2_passes.class_mean_patch_sums(P, targets, k, s.chunk_rows, progress=True)
    if s.top is None:
        r.cands = similarities.candidate_pairs(ctx.conv.weight.detach(), means, r.used, s.low, s.high,
                                               progress=stage2_passes.cosines_shown)
    else:
        r.cands = similarities.lowest_pairs(ctx.conv.weight.detach(), means, r.used, s.top,
                                            progress=stage2_passes.cosines_shown)
    report_candidates(ctx, s, r)
    write_candidates(ctx, s, r)
    if len(r.cands) < stage2_advice.FEW and (s.top is None or len(r.cands) < s.top):  # not what --top N asked
        stage2_advice.advise(ctx, s, (A, targets), r.counts, means)


def report_candidates(ctx, s, r):
    """Print the strongest candidates of Result ``r`` and the summary line."""
    cands, hist, counts = r.cands, r.hist, r.counts
    table = tables.candidate_table(cands, r.class_names, lambda c, y: f"{int(hist[y, c])} of {int(counts[y])}")
    if table:
        print(f"the {len(table) - 1} strongest candidates of layer '{ctx.layer_path}' (lowest cosine first; the "
              f"files list all of them):")
        print("\n".join(table))
    which = (f"with {s.low} <= cosine < {s.high}" if s.top is None else
             f"of lowest cosine (--top {s.top}, any cosine)")
    print(f"{len(cands)} candidates (channel, class1, class2) {which}; "
          f"{len(similarities.polysemantic_channels(r.used))} channels use two or more classes "
          f"(tau={s.tau}, p={s.p})")


def write_candidates(ctx, s, r):
    """The published table (under --out_dir), the candidates with their settings and the histograms (in the
    store folder); the sign report (none for the published rule, whose files stay as they were) goes into both
    JSON files."""
    cands, hist = r.cands, r.hist
    base = names.candidates_base(ctx.name, s.tau, s.p, s.low, s.high, s.sign, s.top)
    table = "Channel,Class1,Class2,CosineSimilarity\n" + "".join(
        f"{d['channel']},{d['class1']},{d['class2']},{d['cosine_similarity']:.4f}\n" for d in cands)
    out_txt = names.candidates_table(s.out_dir, base)
    atomic.write_text(out_txt, table)
    settings = {"proportion_attribution_required": s.tau, "p": s.p, "cos_sim_low": s.low, "cos_sim_high": s.high,
                "model": ctx.model_spec, "layer": ctx.layer_path, "weights": ctx.weights_id}
    if s.top is not None:  # the window was not used: the record says so (without --top: the files as before)
        settings.update(top=s.top, cos_sim_low=None, cos_sim_high=None,
                        selection=f"the {s.top} pairs of lowest cosine (--top), whatever their cosine")
    if r.sign_report:  # published: the same files as before the flag existed
        settings.update(importance_sign=s.sign, sign_report=r.sign_report)
    out_json = names.candidates_json(s.store_dir, base)
    atomic.write_json(out_json, dict(settings, classes=r.class_names, candidates=cands))
    atomic.write_json(names.histograms(s.store_dir, ctx.name, s.tau, s.sign),
                      dict(settings, images_per_class=r.counts.tolist(), histogram_class_by_channel=hist.tolist()),
                      indent=None)
    atomic.save_npy(names.histograms(s.store_dir, ctx.name, s.tau, s.sign, ext="npy"), hist.numpy().astype(np.int32))
    print(f"wrote {out_txt} and {out_json}")


def _pairs(mask):
    """(K, C) bool -> [[channel, class], ...] where it is True."""
    return [[int(c), int(y)] for y, c in torch.nonzero(mask).tolist()]


def sign_report_of(h, counts, pp, bn_name, positions):
    """What --importance_sign positive_activation changes against the published rule: a dict of counts and
    [channel, class] pairs. h: ``stage2_passes.sign_histograms``'s dict; counts: (K,) N_y."""
    used = {key: similarities.used_classes(h[key], counts, pp) for key in ("published", "positive_activation")}
    # pairs the published rule uses only thanks to images on which the layer's summed activation is negative
    without_negative = similarities.used_classes(h["published"] - h["negative_layer_activation"], counts, pp)
    return {
        "batchnorm": bn_name,
        "output_positions": positions,
        "important_image_channel_pairs": int(h["published"].sum()),
        "important_with_negative_layer_activation": int(h["negative_layer_activation"].sum()),
        "important_with_positive_activation": int(h["positive_activation"].sum()),
        "used_pairs_published": int(used["published"].sum()),
        "used_pairs_positive_activation": int(used["positive_activation"].sum()),
        "used_only_through_negative_layer_activation": _pairs(used["published"] & ~without_negative),
        "dropped_by_positive_activation": _pairs(used["published"] & ~used["positive_activation"]),
        "added_by_positive_activation": _pairs(used["positive_activation"] & ~used["published"]),
    }


def positive_activation_histogram(ctx, s, arrays, counts):
    """H[y, c] under --importance_sign positive_activation, and what it changes against the published rule.

    arrays: the store's (attributions, labels, patch sums); counts: (K,) N_y.
    The BatchNorm after the layer and the layer's output size come from forwards of a blank image (the
    store's transform makes every image the crop size). Returns (hist, report dict); prints the report.
    """
    _, positions, bn_name = loading.layer_signs_and_positions(ctx.model, ctx.conv, loading.blank(ctx.transform.crop))
    bn = None if bn_name is None else ctx.model.get_submodule(bn_name)
    if bn is None:
        print(tables.no_batchnorm_note(ctx.layer_path))
    affine = None if bn is None else loading.batchnorm_affine(bn)
    # sign_histograms holds about four times class_histogram's memory per row: a quarter of the rows at a time
    A, targets, P = arrays
    layer = similarities.SummedLayer(ctx.conv.weight, ctx.conv.bias, positions, affine)
    h = stage2_passes.sign_histograms(A, targets, P, len(counts), s.tau, layer, max(1, s.chunk_rows // 4), progress=True)
    report = sign_report_of(h, counts, s.p, bn_name, positions)
    print("\n".join(tables.sign_report_lines(report, ctx.layer_path)))
    return h["positive_activation"], report
