"""Run the Vim mixer's Triton kernels (selective scan and causal conv1d, forward and backward) a few times at one
shape, and nothing else: a small program for a kernel profiler to attach to.

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \\
        -k regex:'_fwd_kernel|_bwd_kernel|_conv_' --launch-skip 4 --launch-count 4 \\
        python benchmarks/mixer_kernels.py --batch 256 --length 197

(``--launch-skip 4`` skips the first iteration's four kernels -- scan forward and backward, convolution forward
and backward, the convolutions of both directions at once as the mixer runs them -- which include compilation; at long sequences the scan also launches its split pass and
``_combine_kernel``.) Inputs are laid out as the mixer passes them:
channels-contiguous bf16 views, dim 384 and N 16 (Vim-Ti), softplus, z, D and delta_bias on.
"""

from __future__ import annotations

import argparse

import torch
from selective_scan import make_inputs

from mmpretrain.ops.causal_conv1d import causal_conv1d_bidirectional
from mmpretrain.ops.selective_scan import selective_scan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mixer_kernels.py runs the triton kernels on a CUDA GPU")
    b, L, dim = args.batch, args.length, args.dim
    inputs = make_inputs(b, dim, L, args.state, torch.bfloat16, "cuda")
    dout = torch.randn(b, L, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    # the convolution's input: the first half of an input projection's (batch, L, 2 dim) output
    x = torch.randn(b, L, 2 * dim, device="cuda", dtype=torch.bfloat16)[..., :dim].transpose(1, 2)
    x.requires_grad_(True)
    params = [torch.randn(dim, 1, 4, device="cuda"), torch.randn(dim, device="cuda")] * 2  # both directions'
    params = [t.clone().requires_grad_(True) for t in params]
    for _ in range(args.iters):
        out = selective_scan(**inputs, delta_softplus=True, backend="triton")
        torch.autograd.grad(out, list(inputs.values()), dout)
        ys = causal_conv1d_bidirectional(x, *params, "silu", backend="triton")
        torch.autograd.grad(ys, [x, *params], [dout, dout])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
