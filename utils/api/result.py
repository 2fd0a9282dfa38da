"""What a call returns: ``Result`` (the command, the files written, the records among them, parsed) and which
record a written file is (``record_kind``, from the names utils/files/names.py builds)."""
import fnmatch
import os
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType

from utils.files import names

# the records a call returns parsed: kind -> pattern of the file's base name (from names.py's own functions)
# (the first that fits; the suffixes first: a run or model name may hold ``_concepts_top``)
RECORDS = {
    "manifest": names.MANIFEST,
    "atlas": names.ATLAS_RECORD,
    "summary": "*" + os.path.basename(names.summary("", "")),
    "info": "*" + os.path.basename(names.info_file("_f")),
    "candidates": "*" + os.path.basename(names.candidates_json("", "")),
    "concepts": os.path.basename(names.concepts_file("", "*", "*")),
}
BEST_CHECKPOINT = f"_f{names.rho_text(names.BEST)}{names.CHECKPOINT_SUFFIX}"  # a split's best-rho checkpoint


def record_kind(path):
    """Which record a written file is (a key of ``RECORDS``), or None."""
    base = os.path.basename(path)
    return next((kind for kind, pattern in RECORDS.items() if fnmatch.fnmatchcase(base, pattern)), None)


@dataclass(frozen=True, repr=False)
class Result:
    """What one call wrote.

    ``stage``: the verb (``importances`` ...); ``command``: the equivalent command line as a tuple of words
    (``python``, the script, its flags; ``command_line`` joins it for a shell); ``files``: absolute paths of
    every file the call wrote, sorted; ``records``: {path: parsed JSON} of the written records (the store's
    manifest, stage 2's candidates or concepts file, stage 3's ``…_info.json``, stage 4's ``…_summary.json``,
    the atlas's ``atlas.json``); ``value``: what ``main`` returned (``--list_layers``: 0).
    """
    stage: str
    command: tuple
    files: tuple = ()
    records: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    value: object = None

    @property
    def command_line(self):
        return shlex.join(self.command)

    def __repr__(self):
        """One line for a notebook cell: the verb, how many files, the records' kinds (not their content)."""
        kinds = sorted({record_kind(p) for p in self.records})
        return (f"<api.Result {self.stage}: {len(self.files)} file(s) written"
                + (f"; records: {', '.join(kinds)}" if kinds else "") + ">")

    def of_kind(self, kind):
        """The parsed records of one kind (a key of ``RECORDS``), in path order."""
        return [rec for path, rec in sorted(self.records.items()) if record_kind(path) == kind]

    def _one(self, kind):
        found = self.of_kind(kind)
        if not found:
            raise ValueError(f"this {self.stage} call wrote no {kind} record (.files lists what it wrote)")
        if len(found) > 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} {kind} records: .of_kind({kind!r}) "
                             f"lists them")
        return found[0]

    @property
    def manifest(self):
        """Stage 1: the store's manifest.json."""
        return self._one("manifest")

    @property
    def candidates(self):
        """Stage 2: the candidates (dicts channel, class1, class2, cosine_similarity), as in the file."""
        return self._one("candidates")["candidates"]

    @property
    def candidates_file(self):
        """Stage 2: the path of the ``…_candidates.json`` written (stage 3's and 4's ``candidates=``)."""
        return self._path("candidates")

    @property
    def concepts(self):
        """Stage 2 with ``label_free=True``: the concepts file."""
        return self._one("concepts")

    @property
    def info(self):
        """Stage 3 (one split): its ``…_info.json``."""
        return self._one("info")

    @property
    def infos(self):
        """Stage 3: every ``…_info.json`` the call wrote."""
        return self.of_kind("info")

    @property
    def best_checkpoint(self):
        """Stage 3 (one split): the path of its ``…_f_best_unnormalized.pth`` (``load_disentangled_model``'s
        checkpoint)."""
        found = [p for p in self.files if p.endswith(BEST_CHECKPOINT)]
        if len(found) != 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} best-rho checkpoints (.files lists them)")
        return found[0]

    @property
    def summary(self):
        """Stage 4 (one run): its ``…_summary.json``."""
        return self._one("summary")

    @property
    def summaries(self):
        """Stage 4: every ``…_summary.json`` the call wrote."""
        return self.of_kind("summary")

    @property
    def atlas(self):
        """The atlas's ``atlas.json`` (``atlas()``, or ``results(..., atlas=FOLDER)``)."""
        return self._one("atlas")

    def _path(self, kind):
        found = [p for p in self.records if record_kind(p) == kind]
        if len(found) != 1:
            raise ValueError(f"this {self.stage} call wrote {len(found)} {kind} records")
        return found[0]
