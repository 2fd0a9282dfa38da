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
from utils.concepts import candidates
from utils.featurevis import settings as fv_settings
from utils.run import cli, context
from utils.stages import sae_view, stage4, stage4_extras
from utils.concepts import by_classes


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store=False)
    p.add_argument("--model_dir", "--store_dir", dest="model_dir", default=None,
                   help="the --store_dir of stages 1-3 (holding models_disentangled/; STORE/models_disentangled "
                        "finds the store in STORE; required; also --store_dir)")
    p.add_argument("--channel_of_interest", "--channel_disentangle", dest="channel_of_interest", type=int,
                   default=None, help="the disentangled channel (required unless --triples; also --channel_disentangle)")
    by_classes.add_args(p, concept3=" of a k-way checkpoint (k = 3 .. 6, as given to stage 3)",
                        triples="evaluate every triple in one process, writing what one run per triple in file "
                                "order writes")
    p.add_argument("--concepts_file", default=None,
                   help="the concepts file stage 3 split --channel_of_interest by: the val images of concept j are "
                        "those of the channel's top --val_top_n val images (by summed activation) whose ARV is "
                        "nearest to cluster j's centroid")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the clusters given to stage 3 (default: all the channel's clusters)")
    p.add_argument("--val_top_n", type=int, default=None,
                   help="with --concepts_file: how many top val images to assign to clusters (default: the file's "
                        "top_n, at most the number of val images)")
    candidates.add_args(p)  # --candidates FILE [--top N] [--all_classes]
    p.add_argument("--atlas", default=None,
                   help="after the runs, write a static site of them into this folder (index.html, one page per "
                        "channel; opens from file://; a new folder, or one an atlas wrote; see docs/atlas.md)")
    p.add_argument("--f", type=float, default=None, help="rho of the checkpoint to evaluate (default: best)")
    p.add_argument("--get_qualitative", action="store_true", help="density plots and their data files")
    p.add_argument("--get_quantitative", action="store_true",
                   help="D1/orig, D2/orig, R/orig per image (D1/orig .. Dk/orig, R/orig for k concepts)")
    p.add_argument("--proportion_attribution_required", type=float, default=None,
                   help="tau: images whose relative attribution to the channel is >= tau count (default: stage 2's "
                        "tau, from the --candidates file or the store's stage-2 records of the layer where they "
                        "agree, else 0.03, the paper's quantitative tau; the line printed says which)")
    p.add_argument("--get_top_images", action="store_true",
                   help="contact sheet of the val images activating the original channel and each D_j the most")
    p.add_argument("--top_k", type=int, default=8, help="images per row of the contact sheet (default 8)")
    p.add_argument("--top_images_all_val", action="store_true",
                   help="scan the whole val split for the top images (default: the concepts' val images)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="leave val images whose files cannot be decoded out of every number (default: stop "
                        "with a message naming the file)")
    p.add_argument("--out_dir", default=".",
                   help="folder for plots/, results_disentanglement/, results_quantitative/ (default: working directory)")
    fv_settings.add_args(p)  # --get_feature_vis and its --fv_* flags
    sae_view.add_args(p)  # --get_sae_view and its --sae_* flags
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    args.model_dir = context.checkpoints_parent(args.model_dir)  # STORE/models_disentangled is STORE
    settings = stage4.Settings.from_args(args)
    ctx = context.setup(args, split="val", store_flag="model_dir")

    extras = stage4_extras.Extras(ctx, fv_settings.Settings.from_args(args) if args.get_feature_vis else None,
                                  sae_view.Settings.from_args(args) if args.get_sae_view else None, settings.out_dir)
    stage4.run(ctx, settings, extras)


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
