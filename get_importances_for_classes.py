r"""Stage 1: channel attributions and patch sums of every training image, into the store.

Example (the paper):
  python get_importances_for_classes.py --data_dir /data/imagenet --store_dir /data/store --model resnet50
Several GPUs: torchrun --nproc_per_node=8 get_importances_for_classes.py ... (same flags).
"""
import torch

from utils import cli, context, data, distributed, importances, store


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
                   help="decode JPEGs on the GPU with torchvision.io.decode_jpeg (falls back to CPU without CUDA)")
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
    # the device (under torchrun: the card of LOCAL_RANK) is chosen and made current in context.setup
    ctx = context.setup(args, split="train")
    distributed.init(ctx.device)
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
    if args.gpu_decode:
        from utils import gpu_decode
        decoder, ds = gpu_decode.setup(ctx.dataset, ctx.device, log=print if rank == 0 else (lambda *a: None),
                                       transform=ctx.transform)
        if decoder is not None:
            ctx.dataset, decode = ds, "gpu"
    if decoder is None:  # workers send uint8 images, normalized on the device (bit-identical inputs)
        ctx.dataset.transform = data.eval_transform_uint8(ctx.transform)
    info = dict(ctx.fingerprint, input_transform=ctx.transform.record(), autocast="bfloat16" if args.autocast_bf16 else None, decode=decode,
                numerics=importances.numerics(ctx.device, cpu_threads))
    importances.run_stage1(ctx.model, ctx.conv, ctx.dataset, folder, info, args.batch_size, ctx.device,
                           cli.default_workers(args.num_workers), chunk,
                           autocast_dtype=torch.bfloat16 if args.autocast_bf16 else None,
                           channels_last=args.channels_last, gpu_decoder=decoder,
                           skip_unreadable=args.skip_unreadable, allow_mixed_numerics=args.allow_mixed_numerics,
                           uint8_images=decoder is None, mean=ctx.transform.mean, std=ctx.transform.std,
                           class_outputs=ctx.class_outputs)
    distributed.close()


if __name__ == "__main__":
    cli.run(lambda: main(build_parser().parse_args()))
