"""The settings of a feature-visualization run (stage 4's --get_feature_vis).

The flag group is ``utils/run/flags.py``'s ``feature_vis`` (its defaults: ``DEFAULTS``);
``utils/run/settings_of_flags.py``'s ``feature_vis`` reads it, with the flags of stage 4 the run also uses
(the batch size, the loader workers, --skip_unreadable) and where the training images and the store are.

``--fv_preset`` names two sets of the size flags (``PRESETS``): ``paper`` (the defaults: the paper's size, meant
for a GPU) and ``quick`` (a look in a minute or two on a CPU); an --fv_* flag given beside it wins. The
preset given is recorded in each run's feature-vis record; without one the record is as before the flag.
"""
from dataclasses import dataclass

from utils.data.folders import DEFAULT_BATCH_SIZE

DEFAULTS = {"fv_size": 512, "fv_steps": 256, "fv_crops": 32, "fv_seed": 0, "fv_lr": 1.0, "fv_spectrum_images": 256,
            "fv_batch_targets": 0}
SIZE_FLAGS = ("fv_size", "fv_steps", "fv_crops", "fv_spectrum_images")
PRESETS = {"paper": {k: DEFAULTS[k] for k in SIZE_FLAGS},
           "quick": {"fv_size": 64, "fv_steps": 32, "fv_crops": 4, "fv_spectrum_images": 64}}


def preset_flags(name):
    """The command-line flags of preset ``name``: '--fv_size 64 --fv_steps 32 ...'."""
    return " ".join(f"--{k} {v}" for k, v in PRESETS[name].items())


@dataclass(frozen=True)
class Settings:
    """One feature-visualization run: image side, steps, crops per image and step, seed, NAdam learning rate,
    training images of the spectrum; images per batch, loader workers (None: the default), what to do with an
    unreadable val image ("error" or "skip"); the training images' data folder and the store (spectrum cache);
    how many targets of consecutive jobs share one optimization (0: each job alone)."""
    size: int = DEFAULTS["fv_size"]
    steps: int = DEFAULTS["fv_steps"]
    crops: int = DEFAULTS["fv_crops"]
    seed: int = DEFAULTS["fv_seed"]
    lr: float = DEFAULTS["fv_lr"]
    spectrum_images: int = DEFAULTS["fv_spectrum_images"]
    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = None
    unreadable: str = "error"
    data_dir: str = None
    store_dir: str = None
    batch_targets: int = DEFAULTS["fv_batch_targets"]  # targets of consecutive jobs optimized together (0: each job alone)
    preset: str = None      # --fv_preset as given (None: not given, the paper's sizes, not recorded)
