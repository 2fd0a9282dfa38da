"""Many channels of a layer in one run (``--candidates FILE [--top N] [--all_classes]``, stages 3 and 4).

FILE is stage 2's ``…_candidates.json`` (pairs (channel, class1, class2) with the cosine of their ARVs) or a
concepts file of ``--label_free`` (clusters per channel with a silhouette). The selection:

- candidates: a channel's strength is its lowest cosine over the pairs stage 2 lists for it (lower = the two
  concepts' ARVs point further apart); the N channels of lowest strength (ties by channel) are split, each
  once: into the two classes of its lowest-cosine pair (ties by class1, class2), or, with ``--all_classes``,
  into every class stage 2 lists for it (k-way, one class per concept, classes ascending). A k-way split
  takes at most 6 concepts: a channel with more classes is refused (one line naming it), as no rule says
  which six would be its concepts;
- concepts file: the N channels of highest silhouette (ties by channel), each split into all its clusters
  (``--all_classes`` does not apply).

Every job's ``where`` is ``"FILE channel c"``: errors and the per-job header lines name it.
"""
import json
import os

from utils.concepts import by_clusters
from utils.concepts.by_classes import MORE_CONCEPTS, Triple, check_triples
from utils.files import store
from utils.errors import UserError

MAX_K = MORE_CONCEPTS[-1]  # a split takes at most six concepts


def _document(path):
    if not os.path.isfile(path):
        raise UserError(f"--candidates {path}: file not found (get_cosine_similarities.py writes it)")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--candidates {path}: cannot read it as JSON ({type(e).__name__}: {e})")
    if isinstance(doc, dict) and isinstance(doc.get("candidates"), list):
        return "candidates", doc
    if isinstance(doc, dict) and isinstance(doc.get("channels"), dict) and "fingerprint" in doc:
        return "concepts", doc
    raise UserError(f"--candidates {path}: neither stage 2's candidates (a 'candidates' list) nor a concepts "
                    f"file ('channels' and 'fingerprint')")


def is_candidates_file(path):
    """Whether ``path`` is stage 2's candidates file (not a concepts file); UserError where it is neither."""
    return _document(path)[0] == "candidates"


def _check_store(path, doc, ctx, classes):
    """Refuse a candidates file written for another model, weights, layer or class list."""
    wanted = {"model": ctx.model_spec, "weights": ctx.weights_id, "layer": ctx.layer_path, "classes": list(classes)}
    diff = [k for k, v in wanted.items() if doc.get(k) != v]
    if diff:
        k = diff[0]
        shown = (f"{len(doc.get(k) or [])} classes, here {len(wanted[k])}" if k == "classes"
                 else f"{doc.get(k)!r}, here {wanted[k]!r}")
        raise UserError(f"--candidates {path} was made from another store: {', '.join(diff)} differ "
                        f"({k}: file {shown})")


def _top(order, top, path):
    """The first ``top`` of ``order`` (all where top is None); UserError where the file has fewer."""
    if top is None:
        top = len(order)
    if top > len(order) or not order:
        raise UserError(f"--top {top}: {path} lists {len(order)} channel{'s' if len(order) != 1 else ''}")
    return order[:top]


def strongest_channels(cands, top, path):
    """Channels of a candidates list by lowest cosine (ties by channel): [(channel, its pairs by cosine)]."""
    pairs = {}
    for d in cands:
        pairs.setdefault(int(d["channel"]), []).append(d)
    for ps in pairs.values():
        ps.sort(key=lambda d: (d["cosine_similarity"], d["class1"], d["class2"]))
    order = sorted(pairs, key=lambda c: (pairs[c][0]["cosine_similarity"], c))
    return [(c, pairs[c]) for c in _top(order, top, path)]


def class_concepts(channel, pairs, all_classes, where):
    """The Triple of one channel: its lowest-cosine pair, or (``all_classes``) every listed class, one each."""
    if not all_classes:
        return Triple(channel, [int(pairs[0]["class1"])], [int(pairs[0]["class2"])], where)
    classes = sorted({int(y) for d in pairs for y in (d["class1"], d["class2"])})
    if len(classes) > MAX_K:
        raise UserError(f"{where}: --all_classes would split it into {len(classes)} concepts (classes {classes}); "
                        f"a split takes at most {MAX_K}: drop --all_classes, or lower --top")
    return Triple(channel, [classes[0]], [classes[1]], where, [[y] for y in classes[2:]])


def read_selection(path, ctx, classes, top=None, all_classes=False, keys=store.MATCH_KEYS, num_rows=None):
    """The Concepts of the selection of ``path`` (see the module docstring), in selection order.

    ctx: the stage's context (model, weights, layer, fingerprint); classes: the store's (stage 3) or val
    split's (stage 4) class folder names; keys, num_rows: how a concepts file is checked (``by_clusters``).
    """
    kind, doc = _document(path)
    if kind == "candidates":
        _check_store(path, doc, ctx, classes)
        out = [class_concepts(c, ps, all_classes, f"{path} channel {c}")
               for c, ps in strongest_channels(doc["candidates"], top, path)]
        check_triples(ctx, out, "--candidates")
        return out
    if all_classes:
        raise UserError(f"--all_classes: {path} is a concepts file; each channel is split into all its clusters")
    silhouette = {int(c): float(e.get("silhouette") or float("-inf")) for c, e in doc["channels"].items()
                  if len(e.get("clusters") or []) >= 2}
    chosen = _top(sorted(silhouette, key=lambda c: (-silhouette[c], c)), top, path)
    file, out = by_clusters.ConceptsFile(path, doc, by_clusters.file_sha256(path)), []  # one read, one hash
    for c in chosen:
        concepts = file.concepts(ctx.fingerprint, c, keys=keys, num_rows=num_rows)
        concepts.where = f"{path} channel {c}"
        out.append(concepts)
    return out


def selection_label(concepts, all_classes):
    """How the whole-layer network's file names a selection: ``top{N}``, ``top{N}_all_classes`` or
    ``top{N}_clusters`` (a concepts file)."""
    kind = "_all_classes" if all_classes else ("_clusters" if "clusters" in concepts[0].info_keys() else "")
    return f"top{len(concepts)}{kind}"
