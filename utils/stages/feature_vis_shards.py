"""Stage 4's feature visualizations shared out over torchrun processes
(``torchrun --nproc_per_node N get_results.py ... --get_feature_vis``; one process per card).

The optimizations are planned as one process plans them (``feature_vis.BatchedJobs``: consecutive jobs up to
--fv_batch_targets targets, or each job alone) and dealt round-robin: optimization i goes to rank i mod N.
Rank 0 alone reads the val images and checks every job (the stage's one pass); then it tells every rank either
the error that stops the run (nothing written) or, per job, the concepts its figure ranks val crops by. Each
rank then optimizes, draws and writes the files of its jobs, as one process writes them; rank 0 gathers the
figures' paths for the jobs' summaries, copies the last job's figure to the latest run's name and writes
everything else of the stage (results, SAE view, atlas). The files equal those of one process where the
devices compute alike (on CPU: with the same number of threads).
"""
from utils.stages import distributed
from utils.errors import UserError
from utils.stages import feature_vis

TIMEOUT_HOURS = 24  # how long a rank waits for the others: rank 0's pass, or the slowest rank's share


def world_size():
    """How many processes torchrun started (1 without torchrun)."""
    return distributed.world()[1]


def deal(plan, rank, size):
    """The optimizations of ``plan`` (a list of runs) that ``rank`` of ``size`` makes: every size-th from rank."""
    return plan[rank::size]


def send(error=None, concepts_of=None):
    """Rank 0: tell every other rank the error that stops the run, or {run name: (concept lists, val images)}."""
    distributed.from_rank0((error, concepts_of))


def receive():
    """Another rank: rank 0's {run name: (concept lists, val images)}; UserError with rank 0's error."""
    error, concepts_of = distributed.from_rank0(None)
    if error:
        raise UserError(f"rank 0 stopped: {error}")
    return concepts_of


class Shares:
    """The feature visualizations of this rank's jobs. runs: [(run name, channel, state_dict)] in the jobs' order
    (the same on every rank); out_dir: the stage's --out_dir."""

    def __init__(self, ctx, settings, runs, out_dir):
        self.rank, self.size = distributed.world()[:2]
        self.ctx, self.settings, self.out_dir = ctx, settings, out_dir
        self.batched = feature_vis.BatchedJobs(ctx, settings, runs)
        self.jobs = {name: (channel, state_dict) for name, channel, state_dict in runs}
        self.last = runs[-1][0]
        self.mine = [name for run in deal(self.batched.plan, self.rank, self.size) for name in run]
        self.figures = {}

    def make_spectrum(self):
        """Rank 0, before it sends: the spectrum file made (or read) once, before any rank reads it."""
        self.batched.spectrum = feature_vis.spectrum_of(self.settings)

    def draw(self, concepts_of):
        """Optimize, draw and write this rank's jobs; gather every rank's figures (an error of any rank stops every
        rank with its message). Rank 0 then also writes the latest run's copy. Returns {run name: figure path}."""
        error = None
        try:
            for name in self.mine:
                channel, state_dict = self.jobs[name]
                concepts, val_images = concepts_of[name]
                checkpoint = feature_vis.Checkpoint(name, channel, state_dict, concepts, val_images)
                record = feature_vis.run_for_checkpoint(self.ctx, self.settings, checkpoint, self.out_dir,
                                                        prepared=self.batched.take(name), latest=False)
                self.figures[name] = record["figure"]
        except UserError as e:
            error = f"rank {self.rank}: {e}"
        gathered = distributed.gather((self.figures, error))
        error = next((e for _, e in gathered if e), None)
        if error:
            raise UserError(error)
        self.figures = {name: path for figures, _ in gathered for name, path in figures.items()}
        if self.rank == 0:
            feature_vis.copy_as_latest(feature_vis.files_of(self.ctx, self.out_dir, self.last))
        return self.figures
