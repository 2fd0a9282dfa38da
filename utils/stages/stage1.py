"""Stage 1's settings and how a run turns them into a pass over the store.

The flags are ``utils/run/flags.py``'s ``stage1``, read by ``utils/run/settings_of_flags.py``; ``run(settings, setup)`` sets the process up
(deterministic cuBLAS, CPU threads or CUDA float32 precision, the JPEG decoding), describes the numerics in the
store's manifest and fills the store with utils/stages/stage1_pass.py's ``run_stage1``.
"""
import os
from dataclasses import dataclass

import torch

from utils.data import folders
from utils.files import store
from utils.model import loading
from utils.stages import distributed
from utils.stages import stage1_pass
from utils.errors import UserError


@dataclass(frozen=True)
class Settings:
    """Stage 1's settings, one field per flag (``utils/run/flags.py``'s ``stage1`` takes its defaults from here);
    ``num_workers`` None: ``cli.default_workers``."""
    store_dir: str
    batch_size: int = folders.DEFAULT_BATCH_SIZE
    num_workers: int = None
    chunk_size: int = None
    autocast_bf16: bool = False
    channels_last: bool = False
    gpu_decode: bool = False
    gpu_decoder: str = "auto"
    fast_resize: bool = False
    deterministic: bool = False
    cpu_threads: int = None
    tf32: bool = False
    allow_mixed_numerics: bool = False
    skip_unreadable: bool = False


def run(s, setup):
    """Stage 1 with Settings ``s``. ``setup``: () -> utils.run.context.Context of the flags (training split),
    called once the process's environment is set; under torchrun the process group lives for the run."""
    rank = distributed.world()[0]
    if s.deterministic:  # read by cuBLAS when it first starts: before anything runs on the card
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # the device (under torchrun: the card of LOCAL_RANK) is chosen and made current in context.setup
    ctx = setup()
    distributed.init(ctx.device)
    threads = torch.get_num_threads()
    try:
        fill_store(ctx, s, rank)
    finally:  # also after an error: a process group left open aborts the interpreter's exit (gloo's threads)
        distributed.close()
        torch.set_num_threads(threads)  # main(args) in a notebook or test leaves the process's threads as they were


def cpu_threads(ctx, s, folder, rank):
    """The intra-op threads of a CPU run (--cpu_threads, else the count an unfinished store recorded, else
    torch's own: None), set for this process; None on CUDA, where the float32 precision is set instead."""
    if ctx.device.type != "cpu":  # full float32 unless --tf32 (cuDNN's own default would be TF32 for convolutions)
        precision = "tf32" if s.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
        return None
    threads = s.cpu_threads
    if threads is not None and threads < 1:
        raise UserError("--cpu_threads must be at least 1")
    recorded = ((store.Store.peek(folder) or {}).get("numerics") or {}).get("cpu_threads")
    if threads is None and recorded:
        threads = recorded
        if rank == 0:
            print(f"using the store's recorded --cpu_threads {recorded} (so its rows stay byte-identical)")
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def decoding(ctx, s, say):
    """(gpu decoder or None, fast_resize used): the JPEG decoding of ``ctx.dataset`` (changed in place)."""
    decoder = None
    if s.gpu_decode:
        from utils.data import gpu_decode
        t = ctx.transform
        decoder, ds = gpu_decode.setup(ctx.dataset, ctx.device, log=say, decoder=s.gpu_decoder, resize=t.resize,
                                       crop=t.crop, mean=t.mean, std=t.std)
        if decoder is not None:
            ctx.dataset = ds
    fast_resize = s.fast_resize and decoder is None
    if s.fast_resize and not fast_resize:
        say("--fast_resize: not used with --gpu_decode (the GPU resizes)")
    if fast_resize:  # workers send uint8 images decoded at reduced size where possible
        from utils.data import cpu_decode
        cpu_decode.use_fast_resize(ctx.dataset, ctx.transform.resize, ctx.transform.crop)
    elif decoder is None:  # workers send uint8 images, normalized on the device (bit-identical inputs)
        ctx.dataset.transform = folders.eval_transform_uint8(ctx.transform)
    return decoder, fast_resize


def store_info(ctx, s, threads, decoder, fast_resize):
    """The store's fingerprint plus what else changes its numbers (autocast, decoding, ``numerics``)."""
    seed = {"init_seed": loading.INIT_SEED} if ctx.weights_id in ("none", "factory") else {}  # built under it
    return dict(ctx.fingerprint, input_transform=ctx.transform.record(), **seed,
                autocast="bfloat16" if s.autocast_bf16 else None, decode="cpu" if decoder is None else "gpu",
                numerics=stage1_pass.numerics(ctx.device, threads, None if decoder is None else decoder.name, fast_resize,
                                         s.deterministic))


def check_class_error(ctx, folder, info):
    """Class folders that do not fit the model's outputs (``ctx.class_error``) stop the run; a store of other
    settings in the folder is named first."""
    if ctx.class_error is None:
        return
    old = store.Store.peek(folder)
    diff = old is not None and store.describe_mismatch(old, info, store.MATCH_KEYS)
    if diff:
        raise UserError(f"{folder} already holds a store made with other settings: {diff}; pass another "
                            f"--store_dir (nothing was changed)")
    raise ctx.class_error


def fill_store(ctx, s, rank):
    """Create, resume or finish the store of ``ctx`` in ``s.store_dir`` with the numerics the settings ask for."""
    if s.chunk_size is not None and s.chunk_size < 1:
        raise UserError("--chunk_size must be at least 1")
    folder = store.find_folder(s.store_dir, ctx.tag, ctx.name, ctx.layer_path)
    threads = cpu_threads(ctx, s, folder, rank)
    decoder, fast_resize = decoding(ctx, s, print if rank == 0 else (lambda *a: None))
    info = store_info(ctx, s, threads, decoder, fast_resize)
    check_class_error(ctx, folder, info)
    t = ctx.transform
    ps = stage1_pass.PassSettings(batch_size=s.batch_size, device=ctx.device, num_workers=folders.default_workers(s.num_workers),
                             chunk_size=s.chunk_size, autocast_dtype=torch.bfloat16 if s.autocast_bf16 else None,
                             channels_last=s.channels_last, gpu_decoder=decoder, skip_unreadable=s.skip_unreadable,
                             allow_mixed_numerics=s.allow_mixed_numerics, uint8_images=decoder is None,
                             deterministic=s.deterministic, mean=t.mean, std=t.std, class_outputs=ctx.class_outputs)
    stage1_pass.run_stage1(ctx.model, ctx.conv, ctx.dataset, folder, info, ps)
