r"""Stage 3: split one channel into a channel per concept, for every rho, and pick the best rho.

Example (the paper's headline channel: digital clock vs. cauliflower):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --channel_disentangle 1660 \
      --classes_for_concept1 530 --classes_for_concept2 938

All the paper's triples in one process (one model load, one pass over the union of their images;
the files are byte-identical to one run per triple):
  python disentangle_channel.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --nr_channels_in_layer_of_interest 2048 --triples paper_triples.txt

Three (up to six) concepts, or the clusters of a concepts file (get_cosine_similarities.py --label_free);
--rho_score robust picks the best rho by the bounded score (both choices are always printed):
  python disentangle_channel.py ... --channel_disentangle 1660 --classes_for_concept1 530 \
      --classes_for_concept2 938 --classes_for_concept3 409,892
  python disentangle_channel.py ... --channel_disentangle 1660 \
      --concepts_file /data/store/results_get_cosine_similarities/resnet50_concepts_top100.json --clusters 0 2

The 50 strongest channels of stage 2's candidates in one process (resumable; see docs/atlas.md), and one
network with all of them split:
  python disentangle_channel.py ... --candidates \
      /data/store/results_get_cosine_similarities/resnet50_required0.05_p0.75_cossim0.0to1.0_candidates.json \
      --top 50 --export_model
"""
from utils.run import cli, context, flags, settings_of_flags
from utils.stages import stage3


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store_aliases=("--model_dir",))
    flags.stage3(p)
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "store_dir")
    settings = settings_of_flags.stage3(args)  # flags that do not fit together: one line before the model loads
    ctx = context.setup(args, split="train", store_flag="store_dir")
    stage3.run(ctx, settings_of_flags.resolved(settings, ctx.spec))


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
