"""Stage 4's extras for each job: the feature visualizations (``--get_feature_vis``) and the SAE view
(``--get_sae_view``), each from its own settings; ``stage4.run`` calls them with each job's checkpoint."""
from utils.stages import feature_vis, sae_view


class Extras:
    """``check()`` refuses the extras' settings for the layer; calling it with one job returns the summary
    entries of what it drew (``feature_vis``, ``sae_view``: the figures' paths). fv, sae: the feature-vis and
    SAE-view Settings, None for an extra not asked for."""

    def __init__(self, ctx, fv, sae, out_dir):
        self.ctx, self.fv, self.sae, self.out_dir = ctx, fv, sae, out_dir
        self.batched = None

    def check(self):
        if self.sae is not None:
            sae_view.check(self.sae, self.ctx.conv)

    def prepare(self, runs):
        """Before any job writes: with --fv_batch_targets, plan the feature visualizations of the jobs in runs of
        consecutive jobs (``feature_vis.BatchedJobs``). runs: [(run name, channel, state_dict)] in the jobs' order."""
        if self.fv is not None and self.fv.batch_targets and len(runs) > 1:
            self.batched = feature_vis.BatchedJobs(self.ctx, self.fv, runs)

    def __call__(self, job, state_dict, run_name, index, concept):
        out = {}
        if self.fv is not None:
            concept_lists, val_images = job.featurevis_concepts(index, concept)
            prepared = self.batched.take(run_name) if self.batched else None
            out["feature_vis"] = feature_vis.run_for_checkpoint(self.ctx, self.fv, state_dict, job.channel,
                                                                concept_lists, run_name, self.out_dir,
                                                                val_images=val_images,
                                                                prepared=prepared)["figure"]
        if self.sae is not None:
            out["sae_view"] = sae_view.run_for_channel(self.ctx, self.sae, job.channel, job.sae_classes(), run_name,
                                                       self.out_dir)["figure"]
        return out
