"""Where a command line's concepts come from, for stages 3 and 4: one ``ConceptSource`` and its one ``read``.

Three kinds, exactly one of them given (``utils/run/settings_of_flags.py``'s ``concept_source`` reads the flags):

- classes: the ``Triple`` s of ``--triples FILE`` or of the per-triple flags (``--classes_for_concept1 .. 6``),
  parsed from the flags before anything else is read;
- a concepts file (``--concepts_file`` of ``get_cosine_similarities.py --label_free``) and ``--clusters``: one
  channel split into its clusters (``by_clusters``), read once the model and data are known;
- a candidates file (``--candidates`` with ``--top``, ``--all_classes``): many channels (``candidates``).

``read`` checks the concepts against the layer and the data and returns the jobs: a list of ``Concepts``
(``utils.concepts.base``), in the order the stage runs them.
"""
from dataclasses import dataclass

from utils.concepts import by_clusters, candidates as candidates_file, checks
from utils.concepts.by_classes import check_triples
from utils.errors import UserError
from utils.files import store


@dataclass(frozen=True)
class ConceptSource:
    """channel: the stage's channel flag (--channel_disentangle / --channel_of_interest; None with --candidates);
    triples: the Triples of classes (None: a file gives the concepts); triples_file: the --triples file they came
    from (None: the per-triple flags); concepts_file, clusters: the concepts file and the clusters asked for (None:
    all the channel's); candidates, top, all_classes: the candidates file and its selection."""
    channel: int = None
    triples: tuple = None
    triples_file: str = None
    concepts_file: str = None
    clusters: tuple = None
    candidates: str = None
    top: int = None
    all_classes: bool = False

    @property
    def header(self):
        """Whether each job's lines start with a header line naming it (many jobs: --triples, --candidates)."""
        return self.triples_file is not None or self.candidates is not None

    def check(self, ctx, channel_flag):
        """Refuse (one line) a channel or classes the layer and data do not have, before any file is read:
        the concepts file's channel, or every triple (the candidates' are checked by ``read``)."""
        if self.candidates is not None:
            return
        if self.triples is None:
            if self.concepts_file is None:
                raise UserError(f"no concepts: give {channel_flag} and --classes_for_concept1, "
                                f"--classes_for_concept2, or --triples, --concepts_file or --candidates")
            checks.check_channel(ctx, self.channel, channel_flag)
        else:
            check_triples(ctx, self.triples, channel_flag)

    def read(self, ctx, channel_flag, classes, keys=store.MATCH_KEYS, num_rows=None):
        """The jobs' ``Concepts``, every one checked against the model, layer and data.

        ctx: the stage's context (model, weights, layer, fingerprint, dataset); channel_flag: how errors name the
        channel; classes: the class folder names the files must have been made with (the store's, stage 3, or
        the val split's, stage 4); keys, num_rows: how a concepts file is checked against the store
        (``by_clusters.read_concepts_file``)."""
        if self.candidates is not None:
            return candidates_file.read_selection(self.candidates, ctx, classes, self.top, self.all_classes,
                                                  keys=keys, num_rows=num_rows)
        self.check(ctx, channel_flag)
        if self.triples is not None:
            return list(self.triples)
        return [by_clusters.read_concepts_file(self.concepts_file, ctx.fingerprint, self.channel, self.clusters,
                                               keys=keys, num_rows=num_rows)]
