"""How much TF32 would move stage 1's attributions and the stage-2 candidates, emulated on the CPU.

On NVIDIA GPUs since Ampere, cuDNN runs float32 convolutions in TF32 unless told otherwise: the
inputs and weights of every convolution are rounded to a 10-bit mantissa (float32 has 23) and the
products are accumulated in float32. Stage 1 runs in full float32 unless ``--tf32`` is given (which
also lets matrix products use TF32). Without a GPU, the same rounding is emulated here: a forward
convolution rounds its input to TF32 inside the operation (round to nearest, ties to even) and the
weights are rounded once; ``--matmul`` rounds the Linear layers' inputs and weights too (what ``--tf32`` does).
The workload is the benchmarks' (benchmarks/workload.py; random weights: the size of the effect, not a property of
the paper's trained ResNet-50).

  python -m benchmarks.studies.tf32_effect [--workdir DIR]
"""
import argparse

import numpy as np

from benchmarks import measure, workload
from benchmarks.studies import bf16_effect


def round_tf32(x):
    """float32 tensor rounded to TF32 (10 explicit mantissa bits), round to nearest, ties to even.
    The gradient passes through unchanged (stage 1 back-propagates from the logits to the layer)."""
    import torch
    i = x.detach().float().contiguous().view(torch.int32)
    i = (i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF
    return x + (i.view(torch.float32) - x).detach()


def emulate_tf32(model, matmul=False):
    """Round the weights of every Conv2d (and Linear with ``matmul``) to TF32 once, and their inputs inside
    the operation (as the GPU does: the layer's input tensor itself, which stage 1's patch sums read, stays
    float32)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (matmul and isinstance(m, nn.Linear)):
            with torch.no_grad():
                m.weight.copy_(round_tf32(m.weight))
        if isinstance(m, nn.Conv2d):
            m._conv_forward = (lambda mod: lambda x, w, b: nn.Conv2d._conv_forward(mod, round_tf32(x), w, b))(m)
        elif matmul and isinstance(m, nn.Linear):
            m.forward = (lambda mod: lambda x: F.linear(round_tf32(x), mod.weight, mod.bias))(m)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    import torch
    x = torch.tensor([1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -10])
    assert round_tf32(x).tolist() == [1.0, 1.0, 1.0 + 2 ** -9, 1.0 + 2 ** -10]  # ties to even, 10 bits kept
    wl = workload.DEFAULT
    with measure.workdir_from(wl, args.workdir) as workdir:
        print(f"workload: {wl.describe()}; TF32 emulated on the CPU")
        ref, w = bf16_effect.stage1(wl, workdir, "cpu", "fp32", False, False)

        def emulated(matmul):
            model, conv = workload.build_model()
            return emulate_tf32(model, matmul=matmul), conv
        conv, _ = bf16_effect.stage1(wl, workdir, "cpu", "tf32conv", False, False, build=lambda: emulated(False))
        both, _ = bf16_effect.stage1(wl, workdir, "cpu", "tf32all", False, False, build=lambda: emulated(True))
        bf16_effect.compare(ref, conv, w, "TF32 convolutions (cuDNN's default) vs float32", wl.classes)
        bf16_effect.compare(ref, both, w, "TF32 convolutions and matrix products (--tf32) vs float32", wl.classes)
        print("(the weight of layer4.2.conv3 is the emulated model's, rounded; the cosines use the float32 weight)")


if __name__ == "__main__":
    main()
