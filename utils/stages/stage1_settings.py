"""Stage 1's own flags, the settings they make, and how a run turns them into a pass over the store.

``add_args`` adds the flags, ``Settings.from_args`` reads them; ``run(settings, setup)`` sets the process up
(deterministic cuBLAS, CPU threads or CUDA float32 precision, the JPEG decoding), describes the numerics in the
store's manifest and fills the store with utils/stages/stage1.py's ``run_stage1``.
"""
import os
from dataclasses import dataclass

import torch

from utils.data import folders
from utils.data.gpu_decode import DECODERS
from utils.files import store
from utils.model import loading
from utils.run import cli, distributed
from utils.stages import stage1


def add_args(p):
    """Stage 1's own flags."""
    p.add_argument("--chunk_size", type=int, default=None,
                   help="rows per resumable chunk (default: an unfinished store's, else a multiple of --batch_size near 2048)")
    p.add_argument("--autocast_bf16", action="store_true",
                   help="run the model under bfloat16 autocast (faster on GPU; changes attributions slightly)")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--gpu_decode", action="store_true",
                   help="decode JPEGs on the GPU: nvImageCodec (its hardware decoder on A100/H100/H200) when the "
                        "optional package is installed (requirements-gpu.txt), else torchvision.io.decode_jpeg "
                        "(nvJPEG); falls back to CPU decoding without CUDA. The store records the decoder")
    p.add_argument("--gpu_decoder", choices=("auto",) + DECODERS, default="auto",
                   help="with --gpu_decode: which GPU JPEG decoder (default auto: nvimgcodec if installed, "
                        "else nvjpeg)")
    p.add_argument("--fast_resize", action="store_true",
                   help="CPU decoding: reduced-size JPEG decoding for images at least twice the resize "
                        "target, and a resize of the center crop's region only (faster; moves a few pixels "
                        "by a grey level or more, recorded in the store's numerics; see utils/data/cpu_decode.py)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (cuDNN deterministic, no benchmark mode): on one card a "
                        "resumed or torchrun store equals a single run byte for byte; slower. Recorded in "
                        "the store's numerics, so a resume needs it too")
    p.add_argument("--cpu_threads", type=int, default=None,
                   help="intra-op threads of each process when the model runs on the CPU (default: torch's "
                        "own count, 1 per process under torchrun; a resumed store keeps the count it "
                        "recorded). CPU convolutions round differently with 1 thread than with several: a "
                        "store is byte-identical across launchers and resumes only with the same count; "
                        "ignored on CUDA")
    p.add_argument("--tf32", action="store_true",
                   help="let CUDA run float32 convolutions and matrix products in TF32 (faster on GPUs "
                        "since Ampere; changes attributions slightly). Default: full float32")
    p.add_argument("--allow_mixed_numerics", action="store_true",
                   help="resume a store under other numerics than it was started with (device, GPU model, "
                        "CPU thread count, TF32); the change is recorded in the manifest")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="record images whose files cannot be decoded as invalid rows (prediction -1, file "
                        "names in the manifest) instead of stopping; later stages leave them out")


@dataclass(frozen=True)
class Settings:
    """Stage 1's settings, one field per flag (defaults: ``add_args``); ``num_workers`` None: ``cli.default_workers``."""
    store_dir: str
    batch_size: int
    num_workers: int
    chunk_size: int
    autocast_bf16: bool
    channels_last: bool
    gpu_decode: bool
    gpu_decoder: str
    fast_resize: bool
    deterministic: bool
    cpu_threads: int
    tf32: bool
    allow_mixed_numerics: bool
    skip_unreadable: bool

    @classmethod
    def from_args(cls, args):
        return cls(store_dir=args.store_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                   chunk_size=args.chunk_size, autocast_bf16=args.autocast_bf16, channels_last=args.channels_last,
                   gpu_decode=args.gpu_decode, gpu_decoder=args.gpu_decoder, fast_resize=args.fast_resize,
                   deterministic=args.deterministic, cpu_threads=args.cpu_threads, tf32=args.tf32,
                   allow_mixed_numerics=args.allow_mixed_numerics, skip_unreadable=args.skip_unreadable)


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
        raise cli.UserError("--cpu_threads must be at least 1")
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
                numerics=stage1.numerics(ctx.device, threads, None if decoder is None else decoder.name, fast_resize,
                                         s.deterministic))


def check_class_error(ctx, folder, info):
    """Class folders that do not fit the model's outputs (``ctx.class_error``) stop the run; a store of other
    settings in the folder is named first."""
    if ctx.class_error is None:
        return
    old = store.Store.peek(folder)
    diff = old is not None and store.describe_mismatch(old, info, store.MATCH_KEYS)
    if diff:
        raise cli.UserError(f"{folder} already holds a store made with other settings: {diff}; pass another "
                            f"--store_dir (nothing was changed)")
    raise ctx.class_error


def fill_store(ctx, s, rank):
    """Create, resume or finish the store of ``ctx`` in ``s.store_dir`` with the numerics the settings ask for."""
    if s.chunk_size is not None and s.chunk_size < 1:
        raise cli.UserError("--chunk_size must be at least 1")
    folder = store.find_folder(s.store_dir, ctx.tag, ctx.name, ctx.layer_path)
    threads = cpu_threads(ctx, s, folder, rank)
    decoder, fast_resize = decoding(ctx, s, print if rank == 0 else (lambda *a: None))
    info = store_info(ctx, s, threads, decoder, fast_resize)
    check_class_error(ctx, folder, info)
    t = ctx.transform
    ps = stage1.PassSettings(batch_size=s.batch_size, device=ctx.device, num_workers=cli.default_workers(s.num_workers),
                             chunk_size=s.chunk_size, autocast_dtype=torch.bfloat16 if s.autocast_bf16 else None,
                             channels_last=s.channels_last, gpu_decoder=decoder, skip_unreadable=s.skip_unreadable,
                             allow_mixed_numerics=s.allow_mixed_numerics, uint8_images=decoder is None,
                             deterministic=s.deterministic, mean=t.mean, std=t.std, class_outputs=ctx.class_outputs)
    stage1.run_stage1(ctx.model, ctx.conv, ctx.dataset, folder, info, ps)
