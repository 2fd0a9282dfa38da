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
from utils.concepts import candidates
from utils.concepts import by_classes
from utils.run import cli, context
from utils.stages import stage3


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p, store_aliases=("--model_dir",))
    p.add_argument("--channel_disentangle", "--channel_of_interest", dest="channel_disentangle", type=int, default=None,
                   help="channel of the layer to split (required unless --triples; also --channel_of_interest)")
    by_classes.add_args(p, concept3=(": a split into k = 3 .. 6 concepts (give concepts 3, 4, ... in order, all "
                                     "disjoint); checkpoints are named ..._classes3[...]_f..."),
                        triples="split every triple in one process")
    p.add_argument("--concepts_file", default=None,
                   help="concepts found without labels (get_cosine_similarities.py --label_free writes "
                        "STORE/results_get_cosine_similarities/{model}_concepts_top{N}.json): split "
                        "--channel_disentangle into its clusters (concept j = cluster j's training rows); "
                        "checkpoints are named ..._top{N}_clusters0-1-2_f...")
    p.add_argument("--clusters", nargs="+", type=int, default=None,
                   help="with --concepts_file: the cluster indices to use as concepts, in this order "
                        "(default: all the channel's clusters; at least two)")
    candidates.add_args(p)  # --candidates FILE [--top N] [--all_classes]
    p.add_argument("--rho_score", choices=("published", "robust"), default="published",
                   help="which best-rho score picks the ..._f_best checkpoint: published (sum_j mean q_j, default) "
                        "or robust (bounded; never a rho where a concept's own map is dead on more than half of "
                        "its images, see docs/concepts.md). Both are always printed and recorded in ..._info.json")
    p.add_argument("--exactness_images", type=int, default=4,
                   help="the first N training images, on which the full original and disentangled networks' "
                        "logits are compared (default 4); the split maps are compared with the layer's output on "
                        "every image scored")
    p.add_argument("--no_channels_last", action="store_true",
                   help="score in the default (contiguous) memory layout instead of channels-last: the scores' "
                        "last digits as before channels-last became the default (it is about 1.7x faster on CPU)")
    p.add_argument("--export_model", action="store_true",
                   help="also write the whole disentangled network's state dict (…_f_best_model.pth) and how to "
                        "rebuild it (…_f_best_model.json); utils.disentangle.load_disentangled_model builds it. "
                        "With --candidates: one network with every channel of the selection split "
                        "(models_disentangled/{model}_top{N}[_all_classes]_whole_layer_model.pth and .json)")
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""
    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "store_dir")
    settings = stage3.Settings.from_args(args)
    stage3.run(context.setup(args, split="train", store_flag="store_dir"), settings)


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
