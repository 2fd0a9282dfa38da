"""Stage 4's checkpoints: find a job's checkpoint in the store, read it, and refuse one that does not belong here.

A checkpoint [D1, ..., Dk, R] belongs to channel c of the layer when D1 + ... + Dk - (k-1) R equals c's filter;
its info file (when there is one) must name the same model, weights and layer, and class folders like the val
split's; for concepts from a file, the same file (sha256). A checkpoint whose sha256 is not the one its info file
recorded (stage 3 records all 21) is refused; for an info file from before these were recorded, the best one must
hold the same tensors as the checkpoint of the rho its info file names.
"""
import os
from dataclasses import dataclass

import torch

from utils.model import disentangled as disentangle
from utils.data import folders
from utils.files import atomic, digests, names, reading, store
from utils.errors import UserError


@dataclass
class Checkpoint:
    """A job's checkpoint: its path, file name, state dict and info (None where it has no info file)."""
    path: str
    name: str
    state_dict: dict
    info: dict = None


def find_checkpoint(model_dir, name):
    """The path of checkpoint file ``name`` (``names.checkpoint_places``); UserError where it is in none."""
    for path in names.checkpoint_places(model_dir, name):
        if os.path.isfile(path):
            return path
    raise UserError(f"checkpoint {name} not found in {model_dir}/models_disentangled: run "
                    f"disentangle_channel.py with the same channel, concepts and --store_dir first "
                    f"(--model_dir is that --store_dir)")


def load_checkpoint(ctx, model_dir, job, rho, val_summary):
    """Find, read and check ``job``'s checkpoint for ``rho`` (a float or "best"). Returns a Checkpoint."""
    name = job.checkpoint(ctx.name, rho)
    path = find_checkpoint(model_dir, name)
    sd = reading.load_state_dict(path, "checkpoint", rewrite_hint(job))
    check_filters(ctx, sd, job.channel, path, job.k)
    info = check_info(ctx, path, val_summary, job.concepts_sha256)
    check_written(ctx, job, path, sd, info, rho)
    return Checkpoint(path, name, sd, info)


def rewrite_hint(job):
    return (f"rerun disentangle_channel.py for channel {job.channel} with the same concepts and --store_dir to "
            f"write it again")


def check_written(ctx, job, path, sd, info, rho):
    """Refuse a checkpoint that is not the file stage 3 wrote beside its info file: its sha256 differs from the
    recorded one, or (an info file without sha256s) the best one's tensors differ from those of the checkpoint at
    the info file's best rho."""
    if not info:
        return
    recorded = (info.get("checkpoint_sha256") or {}).get(os.path.basename(path))
    if recorded:
        if digests.sha256(path) != recorded:
            raise reading.Damaged(path, "is not the checkpoint stage 3 wrote with its info file (its sha256 differs "
                                        "from the one recorded there)", rewrite_hint(job))
        return
    if rho != "best" or info.get("best_rho") is None:
        return
    twin = os.path.join(os.path.dirname(path), job.checkpoint(ctx.name, info["best_rho"]))
    if os.path.isfile(twin):
        other = reading.load_state_dict(twin, "checkpoint", rewrite_hint(job))
        if other.keys() != sd.keys() or any(not torch.equal(other[k], sd[k]) for k in sd):
            raise reading.Damaged(path, f"is not the checkpoint at the best rho {info['best_rho']} that its info "
                                        f"file names (it differs from {os.path.basename(twin)})", rewrite_hint(job))


def check_filters(ctx, sd, channel, path, k):
    """Refuse a checkpoint that is not one of ``k`` concepts of this layer's ``channel`` (shapes, then the merge)."""
    w = ctx.conv.weight[channel].detach()
    problem = disentangle.checkpoint_problem(sd, ctx.conv)
    if problem:
        raise UserError(f"{path}: {problem} for layer '{ctx.layer_path}' (--layer_of_interest "
                        f"{ctx.layer_path}): the checkpoint was made for another layer; pass its "
                        f"--layer_of_interest")
    D = sd["disentangled.weight"]
    n = disentangle.concepts_of_checkpoint(sd)
    if n != k:
        raise UserError(f"{path} splits into {n} concepts, not the {k} given")
    merged = D[0] + D[1] if n == 2 else D[:n].sum(dim=0)
    merged = merged - (D[n] if n == 2 else (n - 1) * D[n])
    if not torch.allclose(merged, w.cpu(), atol=1e-6, rtol=1e-5):
        what = "D1 + D2 - R" if n == 2 else f"D1 + ... + D{n} - {n - 1} R"
        raise UserError(f"{path}: {what} differs from channel {channel}'s filter of layer '{ctx.layer_path}': "
                        f"the checkpoint was made for another model, weights, layer or channel")


def check_info(ctx, path, val_summary, concepts_sha256=None):
    """The checkpoint's info file, or None where there is none; UserError where it names another model, weights,
    layer or class folders than this run's, or (``concepts_sha256``) another concepts file."""
    info_path = names.info_file(path)
    if not os.path.isfile(info_path):
        return None
    info = atomic.read_json(info_path, "rerun disentangle_channel.py with the same channel, concepts and "
                                       "--store_dir to write it again")
    if not isinstance(info, dict):
        raise reading.Damaged(info_path, "not an info file of stage 3 (no JSON object)")
    expected = dict(ctx.fingerprint, classes=val_summary["classes"])
    diff = store.describe_mismatch(info, expected, ("model", "weights_sha256", "layer", "layer_geometry"))
    if info.get("classes") != val_summary["classes"]:  # train classes of the store against the val folders
        stored, now = info.get("classes") or [], val_summary["classes"]
        split = folders.split_class_difference(stored, now) or "the same class folders in another order"
        if not diff:  # the data's fault, not the checkpoint's
            raise UserError(f"--data_dir {val_summary['data_dir']}: {split} (train/ as the store recorded it); "
                            f"train/ and val/ need the same class folders")
        diff = f"{diff}; classes ({split})"
    if diff:
        raise UserError(f"{path} was made with other settings: {diff}")
    if concepts_sha256 is not None and info.get("concepts_sha256") not in (None, concepts_sha256):
        raise UserError(f"{path} was made from another concepts file (sha256 {info['concepts_sha256'][:12]}..., "
                        f"this one {concepts_sha256[:12]}...)")
    return info
