"""Text the stages print, as lines: stage 2's candidate table and sign report, the label-free concepts.

Pure formatting: each function returns strings (a list of lines, or one line) and prints nothing.
"""

TOP_SHOWN = 20  # candidates in stage 2's printed table (the files hold them all)


def candidate_table(cands, names, counts_of, top=TOP_SHOWN):
    """Lines of the strongest candidates, lowest cosine first: channel, both classes (name and index), cosine,
    and how many images of each class find the channel important. ``counts_of(channel, class)`` -> that number.
    An empty list when there is no candidate."""
    rows = sorted(cands, key=lambda d: (d["cosine_similarity"], d["channel"], d["class1"], d["class2"]))[:top]
    if not rows:
        return []
    w1 = max(len(f"{names[d['class1']]} ({d['class1']})") for d in rows)
    w2 = max(len(f"{names[d['class2']]} ({d['class2']})") for d in rows)
    w1, w2 = max(w1, 7), max(w2, 7)
    lines = [f"{'channel':>7}  {'class 1':<{w1}}  {'class 2':<{w2}}  {'cosine':>7}  important for (images)"]
    for d in rows:
        c, y1, y2 = d["channel"], d["class1"], d["class2"]
        lines.append(f"{c:>7}  {f'{names[y1]} ({y1})':<{w1}}  {f'{names[y2]} ({y2})':<{w2}}  "
                     f"{d['cosine_similarity']:7.4f}  {counts_of(c, y1)} / "
                     f"{counts_of(c, y2)}")
    return lines


def no_batchnorm_note(layer):
    """The note of ``--importance_sign positive_activation`` when no BatchNorm takes the layer's output."""
    return (f"note: no BatchNorm takes {layer}'s output: --importance_sign positive_activation uses the layer's "
            f"own summed activation")


def sign_report_lines(report, layer):
    """What ``--importance_sign positive_activation`` changes against the published rule, from its report dict
    (stage 2's ``sign_report``: counts and [channel, class] pairs); ``layer`` the layer's module path."""
    where = f"after {report['batchnorm']}" if report["batchnorm"] is not None else f"of {layer}"
    only_negative = report["used_only_through_negative_layer_activation"]
    return [f"importance_sign positive_activation: an image counts for channel c only where c's summed activation "
            f"{where} is positive",
            f"  important (image, channel) pairs: {report['important_image_channel_pairs']}, of which "
            f"{report['important_with_negative_layer_activation']} with a negative summed activation of "
            f"{layer} (before any BatchNorm) and {report['important_with_positive_activation']} with a "
            f"positive one {where}",
            f"  used (channel, class) pairs: published rule {report['used_pairs_published']}, positive_activation "
            f"{report['used_pairs_positive_activation']}; the published rule uses "
            f"{len(only_negative)} only through images with a negative "
            f"summed activation of {layer}: {only_negative} "
            f"([channel, class]); dropped: {report['dropped_by_positive_activation']}"]


def describe_channel(rec, max_classes=6):
    """Printable lines for one channel's label-free concepts (its concepts-file entry): k, silhouette, purity,
    and per cluster its size and classes."""
    sil = "undefined" if rec["silhouette"] is None else f"{rec['silhouette']:.3f}"
    how = "most negative" if rec["sign"] < 0 else "largest"
    lines = [f"channel {rec['channel']}: k = {rec['k']}, silhouette {sil}, purity {rec['purity']:.2f} "
             f"(top {len(rec['top_rows'])} images by {how} summed activation"
             + (", sign -1: a BatchNorm with a negative scale follows)" if rec["sign"] < 0 else ")")]
    for j, cl in enumerate(rec["clusters"]):
        items = list(cl["classes"].items())
        shown = ", ".join(f"{name} {n}" for name, n in items[:max_classes])
        more = f", ... (+{len(items) - max_classes} classes)" if len(items) > max_classes else ""
        lines.append(f"  cluster {j}: {cl['size']} images: {shown}{more}")
    return lines


def sign_note(negative, channels, bn):
    """The label-free run's note on the sign of "top": ``negative`` of the ``channels`` have sign -1 (the
    BatchNorm ``bn`` after the layer has a negative scale for them)."""
    if negative:
        return (f"{len(negative)} of the {len(channels)} channels have sign -1: the BatchNorm {bn} after the layer "
                f"has a negative scale for them, so their top images are those with the most negative summed "
                f"activation")
    return ("top images = largest summed activation (no BatchNorm with a negative scale follows the layer for "
            "these channels)")
