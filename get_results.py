r"""Stage 4: how well a disentangled channel separates its concepts (two, or k), on the val images.

Example (the paper's quantitative table uses tau = 0.03):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --channel_of_interest 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938 --get_qualitative --get_quantitative

All the paper's triples in one process (one model load, one pass over the union of their val images;
the files are those of one run per triple in file order, byte for byte):
  python get_results.py --data_dir /data/imagenet --model_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --layer_of_interest layer4.2.conv3 --triples paper_triples.txt \
      --get_quantitative --proportion_attribution_required 0.03

A k-way checkpoint (k is read from it): the same concepts as given to stage 3, e.g.
  python get_results.py ... --channel_of_interest 1660 --classes_for_concept1 530 --classes_for_concept2 938 \
      --classes_for_concept3 409 892 --get_qualitative --get_quantitative
  python get_results.py ... --channel_of_interest 1660 --concepts_file \
      /data/store/results_get_cosine_similarities/resnet50_concepts_top100.json --clusters 0 2 --get_quantitative

The channels stage 3 split with --candidates, evaluated in one pass, and their atlas (see docs/atlas.md):
  python get_results.py ... --candidates \
      /data/store/results_get_cosine_similarities/resnet50_required0.05_p0.75_cossim0.0to1.0_candidates.json \
      --top 50 --get_qualitative --get_quantitative --get_top_images --atlas atlas

Several cards: torchrun --nproc_per_node=8 get_results.py ... --get_feature_vis (the feature visualizations are
shared out over the processes, rank 0 does the rest; see docs/feature_visualization.md).
"""
from utils.run import cli, context, flags, settings_of_flags
from utils.stages import stage4, stage4_extras


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store=False)
    flags.stage4(p)
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    settings = settings_of_flags.stage4(args)  # a missing or bad flag: one line before anything is read
    ctx = context.setup(args, split="val", store_flag="model_dir")
    settings = settings_of_flags.resolved(settings, ctx.spec)  # the store (STORE/models_disentangled is STORE)
    extras = stage4_extras.Extras(ctx, settings_of_flags.feature_vis(args, ctx.spec) if args.get_feature_vis else None,
                                  settings_of_flags.sae_view(args, ctx.spec) if args.get_sae_view else None,
                                  settings.out_dir)
    stage4.run(ctx, settings, extras)


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
