r"""Stage 1: channel attributions and patch sums of every training image, into the store.

Example (the paper):
  python get_importances_for_classes.py --data_dir /data/imagenet --store_dir /data/store --model resnet50
Several GPUs: torchrun --nproc_per_node=8 get_importances_for_classes.py ... (same flags).
"""
from utils.run import cli, context, flags, settings_of_flags
from utils.stages import stage1


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p)
    flags.stage1(p)
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "data_dir", "store_dir")
    stage1.run(settings_of_flags.stage1(args),
                        lambda: context.setup(args, split="train", defer_class_error=True))


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
