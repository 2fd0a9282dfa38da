"""Stage 4's --get_feature_vis flags and the settings of a feature-visualization run.

``add_args(parser)`` adds the flag group (bad values: UserError, one line, exit status 2);
``Settings.from_args(args)`` is the one place that reads them, with the flags of stage 4 the run also uses
(the batch size, the loader workers, --skip_unreadable) and where the training images and the store are.

``--fv_preset`` names two sets of the size flags (``PRESETS``): ``paper`` (the defaults: the paper's size, meant
for a GPU) and ``quick`` (a look in a minute or two on a CPU); an --fv_* flag given beside it wins. The
preset given is recorded in each run's feature-vis record; without one the record is as before the flag.
"""
from dataclasses import dataclass

from utils.run.cli import at_least

DEFAULTS = {"fv_size": 512, "fv_steps": 256, "fv_crops": 32, "fv_seed": 0, "fv_lr": 1.0, "fv_spectrum_images": 256,
            "fv_batch_targets": 0}
SIZE_FLAGS = ("fv_size", "fv_steps", "fv_crops", "fv_spectrum_images")
PRESETS = {"paper": {k: DEFAULTS[k] for k in SIZE_FLAGS},
           "quick": {"fv_size": 64, "fv_steps": 32, "fv_crops": 4, "fv_spectrum_images": 64}}


def preset_flags(name):
    """The command-line flags of preset ``name``: '--fv_size 64 --fv_steps 32 ...'."""
    return " ".join(f"--{k} {v}" for k, v in PRESETS[name].items())


def add_args(parser):
    """Stage 4's feature-visualization flags (bad values raise UserError: one line, exit status 2)."""
    g = parser.add_argument_group("feature visualization (--get_feature_vis)")
    g.add_argument("--get_feature_vis", action="store_true",
                   help="MACO feature visualizations of the original channel and of each disentangled map, "
                        "with their top val images: plots/feature_vis_{run}.png and results_disentanglement/"
                        "{run}_feature_vis.json")
    g.add_argument("--fv_preset", choices=tuple(PRESETS), default=None,
                   help="paper: the defaults below (the paper's size, meant for a GPU); quick: "
                        f"{preset_flags('quick')} (a look in minutes on a CPU); an --fv_* flag given beside it "
                        "wins; the preset is recorded in the feature-vis record (default: paper, not recorded)")
    g.add_argument("--fv_size", type=at_least("--fv_size", 1, int), default=None,
                   help="side S of the optimized image in pixels (default 512)")
    g.add_argument("--fv_steps", type=at_least("--fv_steps", 1, int), default=None,
                   help="optimization steps (default 256)")
    g.add_argument("--fv_crops", type=at_least("--fv_crops", 1, int), default=None,
                   help="random crops of each image per step (default 32)")
    g.add_argument("--fv_seed", type=at_least("--fv_seed", 0, int), default=DEFAULTS["fv_seed"],
                   help="seed of the phases, crops and noise (default 0): same seed, same images")
    g.add_argument("--fv_lr", type=at_least("--fv_lr", 1e-12, float, "positive"), default=DEFAULTS["fv_lr"],
                   help="NAdam learning rate on the phase (default 1.0)")
    g.add_argument("--fv_spectrum_images", type=at_least("--fv_spectrum_images", 1, int),
                   default=None,
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
    preset: str = None      # --fv_preset as given (None: not given, the paper's sizes, not recorded)

    @classmethod
    def from_args(cls, args):
        """The settings of the parsed flags: each size flag given, else the preset's (paper without one)."""
        preset = getattr(args, "fv_preset", None)
        size = {k: getattr(args, k) if getattr(args, k) is not None else PRESETS[preset or "paper"][k]
                for k in SIZE_FLAGS}
        return cls(size["fv_size"], size["fv_steps"], size["fv_crops"], args.fv_seed, args.fv_lr,
                   size["fv_spectrum_images"], args.batch_size, args.num_workers,
                   "skip" if args.skip_unreadable else "error", args.data_dir, args.model_dir, args.fv_batch_targets,
                   preset)
