r"""Stage 1: channel attributions and patch sums of every training image, into the store.

Example (the paper):
  python get_importances_for_classes.py --data_dir /data/imagenet --store_dir /data/store --model resnet50
Several GPUs: torchrun --nproc_per_node=8 get_importances_for_classes.py ... (same flags).
"""
import os

import torch

from utils.run import cli
from utils.run import context
from utils.data import folders
from utils.run import distributed
from utils.stages import stage1
from utils.model import loading
from utils.files import store
from utils.data.gpu_decode import DECODERS


def build_parser():
    """The command-line flags of this stage (``main(build_parser().parse_args())`` runs it)."""
    p = cli.parser(__doc__)
    cli.add_model_args(p)
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
    return p


def main(args):
    """Run the stage with the parsed flags ``args`` (callable from a notebook)."""

    if args.list_layers:
        return context.list_layers(args)
    cli.require(args, "data_dir", "store_dir")
    rank = distributed.world()[0]
    if args.deterministic:  # read by cuBLAS when it first starts: before anything runs on the card
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # the device (under torchrun: the card of LOCAL_RANK) is chosen and made current in context.setup
    ctx = context.setup(args, split="train", defer_class_error=True)
    distributed.init(ctx.device)
    try:
        fill_store(args, ctx, rank)
    finally:  # also after an error: a process group left open aborts the interpreter's exit (gloo's threads)
        distributed.close()


def fill_store(args, ctx, rank):
    """Create, resume or finish the store of ``ctx`` in --store_dir with the numerics the flags ask for."""
    chunk = args.chunk_size
    if chunk is not None and chunk < 1:
        raise cli.UserError("--chunk_size must be at least 1")
    folder = store.find_folder(args.store_dir, ctx.tag, ctx.name, ctx.layer_path)
    cpu_threads = None
    if ctx.device.type == "cpu":
        cpu_threads = args.cpu_threads
        if cpu_threads is not None and cpu_threads < 1:
            raise cli.UserError("--cpu_threads must be at least 1")
        recorded = ((store.Store.peek(folder) or {}).get("numerics") or {}).get("cpu_threads")
        if cpu_threads is None and recorded:
            cpu_threads = recorded
            if rank == 0:
                print(f"using the store's recorded --cpu_threads {recorded} (so its rows stay byte-identical)")
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
    else:  # full float32 unless --tf32 (cuDNN's own default would be TF32 for convolutions)
        precision = "tf32" if args.tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    decoder = None
    decode = "cpu"
    say = print if rank == 0 else (lambda *a: None)
    if args.gpu_decode:
        from utils.data import gpu_decode
        decoder, ds = gpu_decode.setup(ctx.dataset, ctx.device, log=say, decoder=args.gpu_decoder,
                                       resize=ctx.transform.resize, crop=ctx.transform.crop,
                                       mean=ctx.transform.mean, std=ctx.transform.std)
        if decoder is not None:
            ctx.dataset, decode = ds, "gpu"
    fast_resize = args.fast_resize and decoder is None
    if args.fast_resize and not fast_resize:
        say("--fast_resize: not used with --gpu_decode (the GPU resizes)")
    if fast_resize:  # workers send uint8 images decoded at reduced size where possible
        from utils.data import cpu_decode
        cpu_decode.use_fast_resize(ctx.dataset, ctx.transform.resize, ctx.transform.crop)
    elif decoder is None:  # workers send uint8 images, normalized on the device (bit-identical inputs)
        ctx.dataset.transform = folders.eval_transform_uint8(ctx.transform)
    seed = {"init_seed": loading.INIT_SEED} if ctx.weights_id in ("none", "factory") else {}  # built under it
    info = dict(ctx.fingerprint, input_transform=ctx.transform.record(), **seed,
                autocast="bfloat16" if args.autocast_bf16 else None, decode=decode,
                numerics=stage1.numerics(ctx.device, cpu_threads, decoder.name if decoder else None,
                                              fast_resize, args.deterministic))
    if ctx.class_error is not None:  # a store of other settings in the folder is the first thing to say
        old = store.Store.peek(folder)
        diff = old is not None and store.describe_mismatch(old, info, store.MATCH_KEYS)
        if diff:
            raise cli.UserError(f"{folder} already holds a store made with other settings: {diff}; pass another "
                                f"--store_dir (nothing was changed)")
        raise ctx.class_error
    stage1.run_stage1(ctx.model, ctx.conv, ctx.dataset, folder, info, args.batch_size, ctx.device,
                           cli.default_workers(args.num_workers), chunk,
                           autocast_dtype=torch.bfloat16 if args.autocast_bf16 else None,
                           channels_last=args.channels_last, gpu_decoder=decoder,
                           skip_unreadable=args.skip_unreadable, allow_mixed_numerics=args.allow_mixed_numerics,
                           uint8_images=decoder is None, deterministic=args.deterministic,
                           mean=ctx.transform.mean, std=ctx.transform.std, class_outputs=ctx.class_outputs)


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
