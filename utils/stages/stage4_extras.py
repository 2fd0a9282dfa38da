"""Stage 4's extras for each job: the feature visualizations (``--get_feature_vis``) and the SAE view
(``--get_sae_view``), each from its own settings; ``stage4.run`` calls them with each job's checkpoint."""
from utils.errors import UserError
from utils.stages import feature_vis, feature_vis_estimate, feature_vis_shards, sae_view


class Extras:
    """``check()`` refuses the extras' settings for the layer; calling it with one job returns the summary
    entries of what it drew (``feature_vis``, ``sae_view``: the figures' paths). fv, sae: the feature-vis and
    SAE-view Settings, None for an extra not asked for."""

    def __init__(self, ctx, fv, sae, out_dir):
        self.ctx, self.fv, self.sae, self.out_dir = ctx, fv, sae, out_dir
        self.batched = self.shares = self.trained = None

    def check(self):
        if self.sae is not None:
            sae_view.check(self.sae, self.ctx.conv)

    def prepare(self, runs):
        """Before any job writes: plan the feature visualizations of several jobs (``feature_vis.BatchedJobs``:
        consecutive jobs together up to --fv_batch_targets, else each alone); under torchrun, this rank's share of them
        (``feature_vis_shards``). runs: [(run name, channel, state_dict)] in the jobs' order."""
        if self.fv is not None and feature_vis_shards.world_size() > 1:
            self.shares = feature_vis_shards.Shares(self.ctx, self.fv, runs, self.out_dir)
            if self.shares.rank == 0:
                print(self.shares.batched.describe() + f", shared out over {self.shares.size} processes")
        elif self.fv is not None and len(runs) > 1:  # also each job alone: one spectrum read for all of them
            self.batched = feature_vis.BatchedJobs(self.ctx, self.fv, runs)
            if self.fv.batch_targets:
                print(self.batched.describe())
        if self.fv is not None and self.shares is None and runs:  # the plan, and on a CPU the time it takes
            feature_vis_estimate.announce(self.ctx, self.fv,
                                          [feature_vis.checked_filters(self.ctx.conv, c, sd) for _, c, sd in runs])

    def share(self, concepts_of):
        """Rank 0 under torchrun, once every job is checked: tell the other ranks the jobs' concepts
        ({run name: ``job.featurevis_concepts(...)``}) and draw this rank's share. Nothing without torchrun."""
        if self.shares is not None:
            try:
                self.shares.make_spectrum()
            except UserError as e:
                self.stop(str(e))
                raise
            feature_vis_shards.send(concepts_of=concepts_of)
            self.shares.draw(concepts_of)

    def stop(self, error):
        """Rank 0 under torchrun: tell the other ranks the error that stops the run (before they draw anything)."""
        if self.fv is not None and feature_vis_shards.world_size() > 1:
            feature_vis_shards.send(error=error)

    def join(self):
        """Another rank under torchrun, after ``prepare``: wait for rank 0's word, then draw this rank's share."""
        self.shares.draw(feature_vis_shards.receive())

    def __call__(self, job, state_dict, run_name, index, concept):
        out = {}
        if self.shares is not None:
            out["feature_vis"] = self.shares.figures[run_name]
        elif self.fv is not None:
            concept_lists, val_images = job.featurevis_concepts(index, concept)
            prepared = self.batched.take(run_name) if self.batched else None
            checkpoint = feature_vis.Checkpoint(run_name, job.channel, state_dict, concept_lists, val_images)
            out["feature_vis"] = feature_vis.run_for_checkpoint(self.ctx, self.fv, checkpoint, self.out_dir,
                                                                prepared=prepared)["figure"]
        if self.sae is not None:  # the SAE read (or trained) once for all the jobs
            self.trained = self.trained or sae_view.load_or_train(self.ctx, self.sae, self.ctx.device)
            out["sae_view"] = sae_view.run_for_channel(self.ctx, self.sae, job.channel, job.sae_classes(), run_name,
                                                       self.out_dir, trained=self.trained)["figure"]
            self.trained = self.trained[:3] + (True,)  # the later jobs reuse it, as their own read would say
        return out
