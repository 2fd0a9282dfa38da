"""The device a stage runs on, from ``--device``, ``--gpu`` and torchrun's environment (``choose_device``, pure),
and making a chosen CUDA card the process's current one before anything else touches CUDA (``select_device``)."""
import os

import torch

from utils.errors import UserError


def choose_device(device, gpu, local_rank, world_size, cuda_count, local_world_size=None):
    """The torch.device a process runs on, from the flags and the launch; no side effects.

    ``device``: the ``--device`` string or None; ``gpu``: ``--gpu`` or None (not given);
    ``local_rank``, ``world_size``: torchrun's LOCAL_RANK and WORLD_SIZE (0 and 1 without torchrun);
    ``cuda_count``: the number of visible CUDA cards (0 without CUDA); ``local_world_size``: torchrun's
    LOCAL_WORLD_SIZE (processes on this node) if known.

    One process: ``--device cuda:N`` is card N, else (bare ``cuda``, or no ``--device`` with CUDA present)
    card ``--gpu`` (default 0); no ``--device`` without CUDA is the CPU.
    Several processes (torchrun): bare ``cuda`` or no ``--device`` is card LOCAL_RANK, so that no two
    processes of a node share a card; an explicit ``cuda:N`` or ``--gpu N`` would put every process on
    card N and is refused. Any other ``--device`` (cpu, ...) is used as given.
    Raises UserError (one line) for CUDA asked for but absent, a card that does not exist, or a conflict.
    """
    if gpu is not None and gpu < 0:
        raise UserError(f"--gpu {gpu}: a card index is 0 or more")
    several = world_size > 1
    if device is None:
        if cuda_count == 0:
            return torch.device("cpu")
        index = None
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {device}: not a device; pass cpu, cuda or cuda:N")
        if dev.type != "cuda":
            return dev
        if cuda_count == 0:
            raise UserError(f"--device {device}: CUDA is not available on this machine; pass --device cpu")
        index = dev.index
    if index is not None:
        if several:
            raise UserError(f"--device {device} under torchrun with {world_size} processes would put every "
                            f"process on card {index}; pass --device cuda (each process takes the card "
                            f"of its LOCAL_RANK) and choose the cards with CUDA_VISIBLE_DEVICES")
        if gpu is not None and gpu != index:
            raise UserError(f"--device {device} and --gpu {gpu} name different cards; pass one of them")
    elif several:
        if gpu is not None:
            raise UserError(f"--gpu {gpu} under torchrun with {world_size} processes would put every process "
                            f"on card {gpu}; leave --gpu out (each process takes the card of its LOCAL_RANK) "
                            f"and choose the cards with CUDA_VISIBLE_DEVICES")
        if local_world_size is not None and local_world_size > cuda_count:
            raise UserError(f"torchrun started {local_world_size} processes on this node but {cuda_count} CUDA "
                            f"card(s) are visible: pass --nproc_per_node {cuda_count} or less")
        index = local_rank
        if index >= cuda_count:
            raise UserError(f"LOCAL_RANK {local_rank} has no CUDA card of its own ({cuda_count} visible): "
                            f"pass --nproc_per_node {cuda_count} or less")
        return torch.device("cuda", index)
    else:
        index = 0 if gpu is None else gpu
    if index >= cuda_count:
        raise UserError(f"CUDA card {index} does not exist ({cuda_count} visible: 0..{cuda_count - 1}); "
                        f"pick one with --gpu N or --device cuda:N")
    return torch.device("cuda", index)


def select_device(device=None, gpu=None, local_rank=None, world_size=None):
    """Choose the device (see ``choose_device``) and make a CUDA card the process's current one.

    ``local_rank``, ``world_size``: None reads torchrun's environment. ``torch.cuda.set_device`` is
    called before anything else touches CUDA, so that no process, pinned-memory allocation or
    DataLoader pinning thread opens a context on card 0 when it runs on another card.
    """
    local_world_size = None
    if local_rank is None or world_size is None:
        from utils.stages import distributed
        _, env_world, env_local = distributed.world()
        local_rank = env_local if local_rank is None else local_rank
        world_size = env_world if world_size is None else world_size
        if "LOCAL_WORLD_SIZE" in os.environ:
            local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = choose_device(device, gpu, local_rank, world_size, cuda_count, local_world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index)
    return dev
