"""torchrun support: rank and world size from the environment, process group, barrier."""
import datetime
import os

import torch
import torch.distributed as dist


def world():
    """(rank, world_size, local_rank) from torchrun's environment variables; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(device, timeout_hours=None):
    """Start the process group when launched by torchrun with several processes (nccl on CUDA, else gloo).
    timeout_hours: how long a collective waits for the slowest process (None: torch's default)."""
    rank, size, _ = world()
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        extra = {} if timeout_hours is None else {"timeout": datetime.timedelta(hours=timeout_hours)}
        if backend == "nccl":
            dist.init_process_group(backend, device_id=torch.device(device), **extra)
        else:
            dist.init_process_group(backend, **extra)
    return rank, size


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active():
    return dist.is_available() and dist.is_initialized()


def from_rank0(obj):
    """Rank 0's ``obj`` on every process (any picklable object); ``obj`` itself without a process group."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj):
    """List of every rank's ``obj``, in rank order, on every process; ``[obj]`` without a process group."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(message):
    """Agree on failure: every process passes its error message or None; returns the first (by rank)
    message of any process, or None when all are fine. A collective: every rank must call it."""
    return next((m for m in gather(message) if m), None)
