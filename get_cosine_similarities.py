r"""Stage 2: gamma-polysemantic candidates (channel, class1, class2) from the store, without any model pass.

Example (the paper's values):
  python get_cosine_similarities.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --proportion_attribution_required 0.03 --p 0.75 --cos_sim_low 0 --cos_sim_high 0.5

The defaults (tau 0.05, p 0.75; the paper's cosine bound 0.5) were chosen for ResNet-50's last conv on
ImageNet. With fewer than 5 candidates, stage 2 prints what the layer has at tau 0.01, 0.03, 0.05 and p 0.5,
0.75 (channels used by two or more classes, pairs, lowest cosine) and a command line that gives a list
(utils/stages/stage2_advice.py). --top N lists the N pairs of lowest cosine, whatever their cosine:
  python get_cosine_similarities.py --store_dir /data/store --proportion_attribution_required 0.01 --p 0.5 --top 20

With --label_free it finds each channel's concepts without class labels instead (utils/stages/label_free.py):
its top --top_n training images by summed activation, k-means on their L1-normalised per-image ARVs,
k by silhouette over 2..5 (or --k); writes STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json:
  python get_cosine_similarities.py --data_dir /data/imagenet --store_dir /data/store --model resnet50 \
      --label_free --channels 1660 522 --top_n 100

--importance_sign positive_activation counts an image for a channel only where the channel's summed
activation after the BatchNorm that follows the layer (ResNet: bn3 after conv3) is positive, computed
from the store's patch sums and the BatchNorm's parameters (no pass over the images), and prints how
many (channel, class) pairs the published rule counts only through images on which the layer's own
summed activation is negative. Its files carry the suffix _positive_activation.
"""
from utils.run import cli, context, flags, settings_of_flags
from utils.stages import label_free
from utils.stages import stage2


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p)
    flags.stage2(p)
    flags.label_free(p)
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "store_dir")
    if args.label_free and args.top is not None:
        raise cli.UserError("--top N lists stage 2's candidate pairs; --label_free takes --top_n (its top images)")
    stage, of_flags = (label_free, settings_of_flags.label_free) if args.label_free else \
        (stage2, settings_of_flags.stage2)
    settings = of_flags(args)  # bad thresholds or --k: one line before the model loads
    ctx = context.setup(args, split="train", store_flag="store_dir")
    stage.run(ctx, settings_of_flags.resolved(settings, ctx.spec))


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
