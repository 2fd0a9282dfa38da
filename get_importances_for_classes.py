r"""Stage 1: channel attributions and patch sums of every training image, into the store.

Example (the paper):
  python get_importances_for_classes.py --data_dir /data/imagenet --store_dir /data/store --model resnet50
Several GPUs: torchrun --nproc_per_node=8 get_importances_for_classes.py ... (same flags).
"""
import argparse

import torch

from utils import cli, context, distributed, importances, store


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Formatter)
    cli.add_model_args(p)
    p.add_argument("--chunk_size", type=int, default=None,
                   help="rows per resumable chunk (default: an unfinished store's, else a multiple of --batch_size near 2048)")
    p.add_argument("--autocast_bf16", action="store_true",
                   help="run the model under bfloat16 autocast (faster on GPU; changes attributions slightly)")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format (GPU)")
    p.add_argument("--gpu_decode", action="store_true",
                   help="decode JPEGs on the GPU with torchvision.io.decode_jpeg (falls back to CPU without CUDA)")
    p.add_argument("--cpu_threads", type=int, default=1,
                   help="intra-op threads of each process when the model runs on the CPU (default 1). CPU "
                        "convolutions round differently with 1 thread than with several, so a store is "
                        "byte-identical between one process, torchrun (which sets 1 thread per process) and "
                        "resumed runs only with the same value; ignored on CUDA")
    args = p.parse_args()

    rank = distributed.world()[0]
    # the device (under torchrun: the card of LOCAL_RANK) is chosen and made current in context.setup
    ctx = context.setup(args, split="train")
    distributed.init(ctx.device)
    chunk = args.chunk_size
    if chunk is not None and chunk < 1:
        raise cli.UserError("--chunk_size must be at least 1")
    cpu_threads = None
    if ctx.device.type == "cpu":
        if args.cpu_threads < 1:
            raise cli.UserError("--cpu_threads must be at least 1")
        cpu_threads = args.cpu_threads
        torch.set_num_threads(cpu_threads)
    decoder = None
    decode = "cpu"
    if args.gpu_decode:
        from utils import gpu_decode
        decoder, ds = gpu_decode.setup(ctx.dataset, ctx.device, log=print if rank == 0 else (lambda *a: None))
        if decoder is not None:
            ctx.dataset, decode = ds, "gpu"
    info = dict(ctx.fingerprint, autocast="bfloat16" if args.autocast_bf16 else None, decode=decode,
                cpu_threads=cpu_threads)
    folder = store.store_folder(args.store_dir, ctx.tag)
    importances.run_stage1(ctx.model, ctx.conv, ctx.dataset, folder, info, args.batch_size, ctx.device,
                           cli.default_workers(args.num_workers), chunk,
                           autocast_dtype=torch.bfloat16 if args.autocast_bf16 else None,
                           channels_last=args.channels_last, gpu_decoder=decoder)
    distributed.close()


if __name__ == "__main__":
    cli.run(main)
