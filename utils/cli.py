"""Flags shared by the four stage scripts, device selection, and one-line error reporting."""
import argparse
import os
import sys

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def add_model_args(parser, store=True, data=True):
    """Flags that identify the model, its weights, the layer and the data (same in every script)."""
    g = parser.add_argument_group("model and layer")
    g.add_argument("--model", default="resnet50",
                   help="torchvision classification model name (resnet50, vgg16, ...) or an import "
                        "path package.module:factory returning an nn.Module (default: resnet50)")
    g.add_argument("--weights", default=None,
                   help="torchvision weights name (default IMAGENET1K_V1 where torchvision has it, "
                        "else DEFAULT), a path to a state-dict file, or 'none' for the model as built")
    g.add_argument("--layer_of_interest", default="last_conv",
                   help="module path of the Conv2d to study (e.g. layer4.2.conv3) or last_conv "
                        "(default: last_conv, which is layer4.2.conv3 for resnet50)")
    g.add_argument("--nr_channels_in_layer_of_interest", type=int, default=None,
                   help="published flag; redundant with the layer, checked against its output channels")
    if data:
        parser.add_argument("--data_dir", required=True,
                            help="ImageFolder root holding train/<class>/... and val/<class>/...")
    if store:
        parser.add_argument("--store_dir", required=True,
                            help="folder of the store that stage 1 writes and later stages read")
    r = parser.add_argument_group("runtime")
    r.add_argument("--batch_size", type=int, default=64, help="images per batch (default 64)")
    r.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: CUDA if present, else CPU)")
    r.add_argument("--gpu", type=int, default=0, help="CUDA card index when on CUDA (default 0)")
    r.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: min(8, CPU count))")
    return parser


def select_device(device=None, gpu=0):
    """Return a torch.device: ``device`` if given, else ``cuda:{gpu}`` when CUDA exists, else CPU."""
    if device is None:
        return torch.device(f"cuda:{gpu}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; pass --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{gpu}")
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"CUDA card {dev.index} does not exist ({torch.cuda.device_count()} present)")
    return dev


def default_workers(num_workers):
    """``--num_workers``, or by default the machine's cores shared among the processes of this node
    (torchrun's LOCAL_WORLD_SIZE), at most 8 and at least 1 per process."""
    if num_workers is not None:
        if num_workers < 0:
            raise UserError("--num_workers must be >= 0")
        return num_workers
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def parse_classes(values, flag):
    """Flatten ``['1', '2,3']`` into ``[1, 2, 3]`` (space- or comma-separated class indices)."""
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise UserError(f"{flag}: '{part}' is not a class index")
    if not out:
        raise UserError(f"{flag}: give at least one class index")
    if len(set(out)) != len(out):
        raise UserError(f"{flag}: a class is listed twice: {out}")
    return out


def run(main):
    """Run ``main()``; turn UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the file system said no: not a directory, permission denied, disk full, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: files written so far are complete; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


Formatter = argparse.RawDescriptionHelpFormatter
