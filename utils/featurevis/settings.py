"""Stage 4's --get_feature_vis flags and the settings of a feature-visualization run.

``add_args(parser)`` adds the flag group (bad values: UserError, one line, exit status 2);
``Settings.from_args(args)`` is the one place that reads them, with the flags of stage 4 the run also uses
(the batch size, the loader workers, --skip_unreadable) and where the training images and the store are.
"""
from dataclasses import dataclass

from utils.run.cli import at_least

DEFAULTS = {"fv_size": 512, "fv_steps": 256, "fv_crops": 32, "fv_seed": 0, "fv_lr": 1.0, "fv_spectrum_images": 256,
            "fv_batch_targets": 0}


def add_args(parser):
    """Stage 4's feature-visualization flags (bad values raise UserError: one line, exit status 2)."""
    g = parser.add_argument_group("feature visualization (--get_feature_vis)")
    g.add_argument("--get_feature_vis", action="store_true",
                   help="MACO feature visualizations of the original channel and of each disentangled map, "
                        "with their top val images: plots/feature_vis_{run}.png and results_disentanglement/"
                        "{run}_feature_vis.json")
    g.add_argument("--fv_size", type=at_least("--fv_size", 1, int), default=DEFAULTS["fv_size"],
                   help="side S of the optimized image in pixels (default 512)")
    g.add_argument("--fv_steps", type=at_least("--fv_steps", 1, int), default=DEFAULTS["fv_steps"],
                   help="optimization steps (default 256)")
    g.add_argument("--fv_crops", type=at_least("--fv_crops", 1, int), default=DEFAULTS["fv_crops"],
                   help="random crops of each image per step (default 32)")
    g.add_argument("--fv_seed", type=at_least("--fv_seed", 0, int), default=DEFAULTS["fv_seed"],
                   help="seed of the phases, crops and noise (default 0): same seed, same images")
    g.add_argument("--fv_lr", type=at_least("--fv_lr", 1e-12, float, "positive"), default=DEFAULTS["fv_lr"],
                   help="NAdam learning rate on the phase (default 1.0)")
    g.add_argument("--fv_spectrum_images", type=at_least("--fv_spectrum_images", 1, int),
                   default=DEFAULTS["fv_spectrum_images"],
                   help="training images that estimate the magnitude spectrum and colour matrix (default 256; "
                        "computed once per data set and size, kept in MODEL_DIR/feature_vis_spectra/)")
    g.add_argument("--fv_batch_targets", type=at_least("--fv_batch_targets", 0, int),
                   default=DEFAULTS["fv_batch_targets"],
                   help="with several jobs (--triples, --candidates): optimize the feature visualizations of "
                        "consecutive jobs together, up to this many targets (images) in one optimization; each "
                        "job's images equal those of its own run up to float rounding (default 0: each job "
                        "alone)")
    return parser


@dataclass(frozen=True)
class Settings:
    """One feature-visualization run: image side, steps, crops per image and step, seed, NAdam learning rate,
    training images of the spectrum; images per batch, loader workers (None: the default), what to do with an
    unreadable val image ("error" or "skip"); the training images' data folder and the store (spectrum cache);
    how many targets of consecutive jobs share one optimization (0: each job alone)."""
    size: int
    steps: int
    crops: int
    seed: int
    lr: float
    spectrum_images: int
    batch_size: int
    num_workers: int
    unreadable: str
    data_dir: str
    store_dir: str
    batch_targets: int = 0  # targets of consecutive jobs optimized together (0: each job alone)

    @classmethod
    def from_args(cls, args):
        return cls(args.fv_size, args.fv_steps, args.fv_crops, args.fv_seed, args.fv_lr, args.fv_spectrum_images,
                   args.batch_size, args.num_workers, "skip" if args.skip_unreadable else "error",
                   args.data_dir, args.model_dir, args.fv_batch_targets)
