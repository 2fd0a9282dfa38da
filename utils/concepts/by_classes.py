"""Several (channel, concept 1, concept 2) triples in one process: the triples file, and batches that
never mix classes.

Triples file (``paper_triples.txt``): one triple per line, ``channel classes1 classes2``; a concept of
several classes is written with commas and no spaces (``522 61,62 687``); ``#`` starts a comment; blank
lines are skipped. Stages 3 and 4 take it as ``--triples FILE`` instead of the per-triple flags.

Why batches never mix classes: a network's output for an image can differ in the last bits with the
batch it is computed in (CPU convolution kernels choose their blocking by batch size; measured on
torchvision's ResNet-18: logits differ by 2e-6 between a batch of 8 and two of 3 and 5). When every batch
holds the images of one class only, cut into pieces of ``batch_size`` the same way whatever else is
processed, each image is computed in the same batch whether one triple runs or twenty, and a run of all
triples writes byte-identical files to one run per triple.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from utils.concepts import checks
from utils.concepts.base import StageConcepts, ValImages
from utils.data import folders
from utils.files import names as file_names
from utils.errors import UserError


@dataclass
class Triple(StageConcepts):
    """One channel to split and its concepts given as classes (lists of class indices, as in the checkpoint
    names): concept j's images are those of its classes, in the training split (stage 3) and in val (stage 4).
    The ``StageConcepts`` interfaces (``utils.concepts.base``)."""
    channel: int
    classes1: list
    classes2: list
    where: str = ""  # "FILE line N" for a triple read from a file, "" for one from the command line
    more: list = field(default_factory=list)  # class lists of concepts 3..k (--classes_for_concept3 ...)

    @property
    def concepts(self):
        """The k class lists: concept 1's, concept 2's, then those of ``more``."""
        return [self.classes1, self.classes2, *self.more]

    @property
    def classes(self):
        """Classes of every concept: concept 1's, then concept 2's, ..."""
        return [y for c in self.concepts for y in c]

    @property
    def k(self):
        return len(self.concepts)

    def _flag(self, j):
        """How messages name concept j: ``FILE line N: concept j`` or ``--classes_for_concept{j}``."""
        return f"{self.where}: concept {j}" if self.where else f"--classes_for_concept{j}"

    def training_rows(self, targets):
        """Store rows whose label (``targets``, -1 for unreadable images) is one of concept j's classes."""
        rows = [np.flatnonzero(np.isin(targets, s)) for s in self.concepts]
        for j, r in enumerate(rows, start=1):
            if not len(r):
                raise UserError(f"{self._flag(j)} {self.concepts[j - 1]}: no readable training image of "
                                f"these classes in the store")
        return rows

    def describe(self):
        return " vs ".join(str(s) for s in self.concepts)

    def label(self, names, j):
        return str([names[y] for y in self.concepts[j - 1]])

    def checkpoint(self, name, rho):
        return file_names.class_checkpoint(name, self.channel, self.concepts, rho)

    def info_keys(self):
        return {f"classes{j}": s for j, s in enumerate(self.concepts, start=1)}

    def val_images(self, ds, data_dir, val_top_n, scan_arvs):
        """The val images of the concepts' classes; UserError where a concept has none."""
        indices = folders.indices_of_classes(ds, self.classes)  # one walk over the labels
        present = {ds.targets[i] for i in indices}
        for j, classes in enumerate(self.concepts, start=1):
            if not present & set(classes):
                raise UserError(f"{self._flag(j)}: no val images of classes {classes} under {data_dir}/val")
        return ValImages(indices, self.classes)

    def val_ids(self, val, labels, indices):
        return class_ids(labels, self.concepts)

    def no_val_images(self, j):
        return f"concept {j}: none of its val images could be read"

    def val_label(self, names, j):
        return ", ".join(names[y] for y in self.concepts[j - 1])

    def summary_keys(self, names, val):
        return {**{f"classes{j}": c for j, c in enumerate(self.concepts, start=1)},
                **{f"class_names{j}": [names[y] for y in c] for j, c in enumerate(self.concepts, start=1)}}

    def val_scope(self):
        return "val images of both concepts" if self.k == 2 else f"val images of the {self.k} concepts"

    def featurevis_concepts(self, index, ids):
        return self.concepts, None

    def sae_classes(self):
        return self.classes


def class_ids(labels, concepts):
    """(N,) labels -> (N,) int64 concept ids 1..k (the concept whose classes hold the label; 0 for none)."""
    out = np.zeros(len(labels), dtype=np.int64)
    for j in range(len(concepts), 0, -1):
        out[np.isin(labels, concepts[j - 1])] = j
    return out


def _int(text, what, where):
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{where}: {what} '{text}' is not an integer")


def _classes(field, what, where):
    parts = field.split(",")
    if any(p == "" for p in parts):
        raise UserError(f"{where}: {what} '{field}': write several classes as 1,2,3 (no spaces, no empty items)")
    out = [_int(p, f"{what} class", where) for p in parts]
    if len(set(out)) != len(out):
        raise UserError(f"{where}: {what} lists a class twice: {field}")
    return out


def parse_classes(values, flag):
    """Flatten ``['1', '2,3']`` into ``[1, 2, 3]`` (space- or comma-separated class indices)."""
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"{flag}: '{part}' is not a class index")
    if not out:
        raise UserError(f"{flag}: give at least one class index")
    if len(set(out)) != len(out):
        raise UserError(f"{flag}: a class is listed twice: {out}")
    return out


def parse_triples(text, source):
    """Triples of a triples file's ``text`` (see the module docstring); ``source`` names the file in errors.

    Returns a list of Triple in file order. Refuses malformed lines and repeated triples (one line each).
    """
    triples, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source} line {n}"
        if len(fields) != 3:
            raise UserError(f"{where}: expected 'channel class1 class2' (several classes as 1,2), "
                            f"found {len(fields)} fields: {line.strip()!r}")
        t = Triple(_int(fields[0], "channel", where), _classes(fields[1], "concept 1", where),
                   _classes(fields[2], "concept 2", where), where)
        key = (t.channel, tuple(t.classes1), tuple(t.classes2))
        if key in seen:
            raise UserError(f"{where}: repeats the triple of line {seen[key]}")
        seen[key] = n
        triples.append(t)
    if not triples:
        raise UserError(f"--triples {source}: no triple in the file (lines 'channel class1 class2')")
    return triples


def read_triples(path):
    """``parse_triples`` of the file at ``path``, with a one-line error if it cannot be read."""
    if not os.path.isfile(path):
        raise UserError(f"--triples {path}: file not found (one 'channel class1 class2' per line)")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--triples {path}: cannot read it ({type(e).__name__}: {e})")
    return parse_triples(text, path)


MORE_CONCEPTS = range(3, 7)  # --classes_for_concept3 .. --classes_for_concept6 (stages 3 and 4)


def triples_given(path, channel, classes1, classes2, channel_flag):
    """The triples to run: those of the file ``path`` (--triples), or the one given by the per-triple flags.

    ``classes1``/``classes2``: the raw flag values (lists of strings) or None (``parse_classes`` reads
    them). Exactly one of the two ways must be used.
    """
    flags = (channel_flag, "--classes_for_concept1", "--classes_for_concept2")
    given = [f for f, v in zip(flags, (channel, classes1, classes2)) if v is not None]
    if path is not None:
        if given:
            raise UserError(f"--triples replaces {', '.join(flags)}: give either the file or the flags "
                            f"(got {' and '.join(given)} too)")
        return read_triples(path)
    if len(given) < 3:
        missing = [f for f in flags if f not in given]
        raise UserError(f"give {', '.join(missing)} (the channel and both concepts), or --triples FILE")
    return [Triple(channel, parse_classes(classes1, flags[1]), parse_classes(classes2, flags[2]))]


def check_triples(ctx, triples, channel_flag):
    """Refuse any triple whose channel or classes do not exist in the layer and data (one line, naming
    the flag or the file line)."""
    for t in triples:
        if t.where:
            try:
                checks.check_channel(ctx, t.channel, "channel")
                checks.check_concepts_k(ctx.dataset, t.concepts,
                                         [f"concept {j}" for j in range(1, len(t.concepts) + 1)])
            except UserError as e:
                raise UserError(f"{t.where}: {e}")
        else:
            checks.check_channel(ctx, t.channel, channel_flag)
            checks.check_concepts_k(ctx.dataset, t.concepts,
                                     [f"--classes_for_concept{j}" for j in range(1, len(t.concepts) + 1)])


def class_batches(indices, labels, batch_size):
    """Batches of ``indices`` that never mix labels: each run of equal labels cut every ``batch_size``.

    indices: (N,) ints in order (ImageFolder order keeps each class together); labels: (N,) their labels.
    Returns a list of lists of indices.
    """
    batches, prev = [], None
    for i, y in zip(indices, labels):
        if y != prev or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append(int(i))
        prev = y
    return batches
