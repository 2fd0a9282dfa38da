"""Flags shared by the four stage scripts, and one-line error reporting (``run``); the device is
``utils.run.device``'s."""
import argparse
import difflib
import errno
import os
import sys

from utils.data import folders
from utils.errors import UserError  # noqa: F401 (the scripts' one-line errors: cli.UserError)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (the flag and what is wrong, then where the flags are listed)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)} (--help lists the flags)\n")

    def suggestion(self, message):
        """'; did you mean --x?' for the unrecognized flags of ``message`` that are close to one of the parser's
        (difflib), else ''."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [f for f in self._option_string_actions if f.startswith("--")]
        hints = []
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                word = word.split("=", 1)[0]  # abbreviations are refused: name the flags they begin
                close = ([f for f in flags if f.startswith(word)][:3]
                         or difflib.get_close_matches(word, flags, n=2, cutoff=0.75))
                if close:
                    hints.append(f"{word}: did you mean {' or '.join(close)}?")
        return ("; " + "; ".join(hints)) if hints else ""


def parser(description):
    """An ArgumentParser for a stage script: abbreviated flags are refused (``--channel`` is not
    ``--channel_disentangle``), errors are one line."""
    return Parser(description=description, formatter_class=Formatter, allow_abbrev=False)


def add_model_args(parser, store=True, data=True, store_aliases=()):
    """Flags that identify the model, its weights, the layer, the input transform and the data (same in every
    script). Stages 2-4 take the ones not given from the store's manifest (``context.setup``)."""
    g = parser.add_argument_group("model and layer (stages 2-4: taken from the store when not given)")
    g.add_argument("--model", default=None,
                   help="torchvision classification model name (resnet50, vgg16, ...) or an import "
                        "path package.module:factory returning an nn.Module (default: the store's torchvision "
                        "name, else resnet50; a factory is code and is never taken from a store: give it here)")
    g.add_argument("--weights", default=None,
                   help="torchvision weights name (default IMAGENET1K_V1 where torchvision has it, "
                        "else DEFAULT), a path to a state-dict file, or 'none' for the model as built "
                        "(initialised with a fixed seed, the same weights in every run)")
    g.add_argument("--layer_of_interest", default=None,
                   help="module path of the Conv2d, grouped Conv2d or Linear to study (e.g. layer4.2.conv3) or "
                        "last_conv, the model's default layer (default: the store's, else last_conv, which is "
                        "layer4.2.conv3 for resnet50; see docs/models.md); --list_layers shows them")
    g.add_argument("--nr_channels_in_layer_of_interest", type=int, default=None,
                   help="published flag; redundant with the layer, checked against its output channels")
    g.add_argument("--list_layers", action="store_true",
                   help="print the model's Conv2d and Linear layers with their weight shapes (the default "
                        "marked, each refused one with why), then exit")
    g.add_argument("--class_index_map", default=None,
                   help="file mapping each class folder to the model's output index: JSON {\"folder\": index} "
                        "or lines 'folder index'. Needed when the model has more outputs than there are class "
                        "folders (unless it has 1000 and every folder is an ImageNet WordNet id, n01440764 ...)")
    t = parser.add_argument_group("input transform (default: the store's, else the paper's ImageNet transform)")
    t.add_argument("--resize", type=int, default=None, help="shorter side of the image before the crop (default 256)")
    t.add_argument("--crop", type=int, default=None, help="side of the centre crop the model sees (default 224)")
    t.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-colour mean subtracted after ToTensor (default ImageNet's 0.485 0.456 0.406)")
    t.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-colour std divided by (default ImageNet's 0.229 0.224 0.225)")
    if data:
        parser.add_argument("--data_dir", default=None,
                            help="ImageFolder root holding train/<class>/... and val/<class>/... "
                                 "(required for stage 1; later stages: default the store's)")
    if store:
        parser.add_argument("--store_dir", *store_aliases, dest="store_dir", default=None,
                            help="folder of the store that stage 1 writes and later stages read (required)"
                                 + (f"; also {', '.join(store_aliases)}" if store_aliases else ""))
    r = parser.add_argument_group("runtime")
    r.add_argument("--batch_size", type=int, default=folders.DEFAULT_BATCH_SIZE, help="images per batch (default 64)")
    r.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: CUDA if present, else CPU)")
    r.add_argument("--gpu", type=int, default=None,
                   help="CUDA card index for a single process (default 0; under torchrun each process "
                        "takes the card of its LOCAL_RANK)")
    r.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: min(8, CPU count))")
    return parser


def require(args, *names):
    """Refuse a missing required flag (one line): they are not argparse-required, so that --list_layers works
    alone."""
    for name in names:
        if getattr(args, name, None) is None:
            raise UserError(f"--{name} is required (--help lists the flags)")


def at_least(flag, low, kind, say=None):
    """An argparse ``type`` that raises UserError (one line, exit status 2) for a value below ``low``."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise UserError(f"{flag} {text}: not a number")
        if not v >= low:
            raise UserError(f"{flag} {text}: must be {say or f'at least {low}'}")
        return v
    return parse


def run(main):
    """Run ``main()``; turn UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the output went to a reader that stopped (| head): no message, as other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        sys.exit(1)
    except OSError as e:  # the file system said no: not a directory, permission denied, disk full, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: no space left on device writing{where.lstrip(':') or ' a file'}; free space and rerun: "
                  f"finished work is kept", file=sys.stderr)
            sys.exit(2)
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: files written so far are complete; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


Formatter = argparse.RawDescriptionHelpFormatter
