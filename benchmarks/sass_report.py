"""Compile Triton kernels for a GPU on a machine without one, and report what the compiler made of them.

For each kernel: registers per thread, spilled bytes (local memory), shared memory, and a count of the SASS
instructions that usually explain a memory-bound kernel's gap (global loads and stores and their widths,
special-function calls, shuffles, barriers, shared-memory traffic, fused multiply-adds). Nothing runs: the
kernels are compiled for ``--arch`` (default sm_90, Hopper) with Triton's bundled ptxas, so the numbers are
free of device time. They are the compiler's static view: instructions in the code, not executed counts.

    python benchmarks/sass_report.py                      # the selective scan kernels at Vim-Ti's shapes
    python benchmarks/sass_report.py --sass OUT_DIR       # also write each kernel's SASS there
    python benchmarks/sass_report.py --lines 20           # and the 20 source lines with the most instructions
    python benchmarks/sass_report.py --config block_d_bwd=16 rows_bwd=4   # another launch configuration
    python benchmarks/sass_report.py --splits             # and the kernels of a split (long) sequence

``--lines`` attributes each SASS instruction to the Python line it came from (the line table Triton puts in
the cubin), with the instruction classes of each line: that is how one finds which statement a kernel spends
its instructions on (a softplus through an accurate log, a reverse scan that shuffles across the warp).
The counts are static (an instruction inside a loop counts once).

The Triton here may differ from the GPU machine's by a version. Registers move by a few between versions, but
layouts can change outright (triton 3.6 and 3.8 order a tensor's axes differently when none is contiguous; see
docs/benchmarks.md, twelfth session): to see the GPU machine's compile, put its Triton first on the path, e.g.
``pip install --no-deps --target /tmp/t36 triton==3.6.0`` and ``PYTHONPATH=/tmp/t36 python benchmarks/sass_report.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# SASS opcode prefixes worth counting, and the name they are shown under
_CLASSES = {
    "LDG": "ld.global", "STG": "st.global", "LDS": "ld.shared", "STS": "st.shared", "LDL": "ld.local",
    "STL": "st.local", "RED": "red/atomic", "ATOM": "red/atomic", "MUFU": "mufu", "SHFL": "shfl",
    "BAR": "bar", "FFMA": "ffma", "FMUL": "fmul", "FADD": "fadd", "F2F": "cvt", "F2FP": "cvt", "HADD2": "half2",
    "HFMA2": "half2", "IMAD": "imad", "ISETP": "isetp", "FSETP": "fsetp", "FSEL": "fsel", "BRA": "branch",
    "LDGSTS": "cp.async",
}


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, num_warps: int, arch: int = 90,
                   divisible: tuple[str, ...] = ()):
    """Compile ``fn`` for ``sm_{arch}``. ``signature``: every runtime argument's Triton type ("*bf16", "i32", ...),
    constexprs included as "constexpr"; ``divisible``: arguments to specialise as multiples of 16 (as Triton does
    at launch for aligned pointers and such integers)."""
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _nv_tool(kernel, tool: str, *flags: str) -> str:
    """The output of one of Triton's bundled NVIDIA tools (cuobjdump, nvdisasm) run on the kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([str(_BIN / tool), *flags, path], capture_output=True, text=True, check=True).stdout


def source_lines(kernel, top: int) -> list[tuple[int, str, int, collections.Counter]]:
    """The ``top`` (file, line) places of the kernel's Python source with the most SASS instructions:
    (instruction count, file path, line number, opcode counts). Triton's own helpers appear too (``tl.sum``'s
    reduction lives in triton/language/standard.py)."""
    sass = _nv_tool(kernel, "nvdisasm", "-c", "-g")
    place, counts, ops = None, collections.Counter(), collections.defaultdict(collections.Counter)
    for line in sass.splitlines():
        m = re.search(r'//## File "(.*)", line (\d+)', line)
        if m:
            place = (m.group(1), int(m.group(2)))
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and place is not None:
            counts[place] += 1
            ops[place][m.group(1)] += 1
    return [(n, f, ln, ops[(f, ln)]) for (f, ln), n in counts.most_common(top)]


def print_lines(kernel, label: str, top: int) -> None:
    print(f"\n{label}: source lines by SASS instructions")
    for n, path, ln, ops in source_lines(kernel, top):
        source = Path(path)
        text = source.read_text().splitlines()[ln - 1].strip()[:70] if source.is_file() else ""
        mix = ", ".join(f"{op} {c}" for op, c in ops.most_common(4))
        print(f"{n:6d}  {source.name + ':' + str(ln):24s} {text:70s}  {mix}")


def report(kernel, label: str, sass_dir: Path | None = None) -> dict:
    """Registers, spills and SASS instruction counts of a compiled kernel (see the module docstring)."""
    usage = _nv_tool(kernel, "cuobjdump", "--dump-resource-usage")
    sass = _nv_tool(kernel, "nvdisasm", "-c")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    counts: collections.Counter = collections.Counter()
    widths: collections.Counter = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if not m:
            continue
        op, mods = m.group(1), m.group(2) or ""
        for prefix, name in _CLASSES.items():
            if op == prefix or (op.startswith(prefix) and prefix in ("LDG", "STG", "BAR", "RED", "ATOM")):
                counts[name] += 1
                if prefix in ("LDG", "STG"):
                    w = re.search(r"\.(8|16|32|64|128|U8|U16|S16)\b", mods)
                    widths[f"{name}.{w.group(1) if w else '32'}"] += 1
                break
        counts["all"] += 1
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / f"{label}.sass").write_text(sass)
    return dict(label=label, regs=regs, stack=stack, shared=shared, counts=counts, widths=widths)


def print_reports(rows: list[dict]) -> None:
    keys = ["all", "ld.global", "st.global", "red/atomic", "ld.shared", "st.shared", "ld.local", "mufu", "ffma",
            "fmul", "fadd", "shfl", "bar", "branch"]
    print(f"{'kernel':40s} {'regs':>4s} {'stack':>5s} {'smem':>6s} " + " ".join(f"{k[:9]:>9s}" for k in keys))
    for r in rows:
        print(f"{r['label']:40s} {r['regs']:4d} {r['stack']:5d} {r['shared']:6d} "
              + " ".join(f"{r['counts'].get(k, 0):9d}" for k in keys))
        print(f"{'':40s} widths: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["widths"].items())))


def _vim_args(fn) -> tuple[dict, tuple[str, ...]]:
    """The specialisation Triton's launcher gives the scan kernels' integer and pointer arguments at Vim-Ti's
    shapes (dim 384, N 16, L 197, channels-contiguous activations; B and C views of x_proj's output, at offsets
    of 12 and 28 elements with a row stride of 44): arguments equal to 1 become constants, multiples of 16 (and
    16-byte aligned pointers) are marked divisible."""
    dim, L, N, R = 384, 197, 16, 12
    values = dict(dim=dim, L=L, N=N, su_b=L * dim, su_d=1, su_l=dim, sdt_b=L * dim, sdt_d=1, sdt_l=dim,
                  sz_b=L * 2 * dim, sz_d=1, sz_l=2 * dim, so_b=L * dim, so_d=1, so_l=dim, sa_b=L * dim, sa_d=1,
                  sa_l=dim, sg_b=L * dim, sg_d=1, sg_l=dim)
    for m in "BC":
        values.update({f"s{m}_b": L * (R + 2 * N), f"s{m}_g": 0, f"s{m}_n": 1, f"s{m}_l": R + 2 * N})
    const = {k: v for k, v in values.items() if v == 1 and k in fn.arg_names}
    div = [k for k, v in values.items() if v != 1 and v % 16 == 0 and k in fn.arg_names]
    div += [a for a in fn.arg_names if a.endswith("_ptr") and a not in ("B_ptr", "C_ptr")]
    return const, tuple(div)


def _scan_rows(sass_dir: Path | None, lines: int = 0, config: dict | None = None, splits: bool = False) -> list[dict]:
    """The selective scan kernels as the Vim mixer launches them (bf16 activations, softplus, D, z, bias), with
    the default launch configuration or ``config``'s fields over it. ``splits``: also the variants a split
    sequence launches (long sequences at small batches): the local passes and the main passes from a carry."""
    from mmpretrain.ops.selective_scan import triton_kernels as tk

    cfg = tk.TritonConfig(**(config or {}))
    rows_bwd = min(cfg.rows_bwd, cfg.block_d_bwd)
    rows = []
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, REVERSE=False, CT=tk.tl.float32,
                 BLOCK_N=16, CHUNK=cfg.chunk)
    types = {"u_ptr": "*bf16", "delta_ptr": "*bf16", "B_ptr": "*bf16", "C_ptr": "*bf16", "z_ptr": "*bf16",
             "out_ptr": "*bf16", "dout_ptr": "*bf16", "du_ptr": "*bf16", "ddelta_ptr": "*bf16", "dz_ptr": "*bf16",
             "add_ptr": "*bf16", "out_scale": "fp32"}
    variants = [(False, False)] + ([(True, False), (False, True)] if splits else [])  # (LOCAL, from a carry)
    kernels = []
    for local, carry in variants:
        kernels.append(("fwd", tk._fwd_kernel, cfg.block_d, cfg.block_d, cfg.num_warps,
                        dict(BLOCK_D=cfg.block_d, LOCAL=local, HAS_INIT=carry, FAST_LOG=True, SUB=cfg.sub_chunk,
                             HAS_ADD=False)))
    for local, carry in variants:
        kernels.append(("bwd", tk._bwd_kernel, cfg.block_d_bwd, cfg.block_d_bwd // rows_bwd, cfg.num_warps_bwd,
                        dict(ROWS=rows_bwd, LANES_D=cfg.block_d_bwd // rows_bwd, LOCAL=local, HAS_CARRY=carry,
                             FAST_LOG=True, SUB=cfg.bwd_sub_chunk,
                             LANE_SUMS=tk.lane_sums(cfg.block_d_bwd // rows_bwd, cfg.bwd_sub_chunk,
                                                    cfg.num_warps_bwd or max(1, cfg.block_d_bwd // rows_bwd // 32),
                                                    torch.bfloat16, 16))))
    for name, fn, block, lanes, warps, extra in kernels:
        ones, div = _vim_args(fn)
        const = dict(flags, **extra, **ones)
        sig = {}
        for arg in fn.arg_names:
            if arg in const:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = types.get(arg, "*fp32")
            else:
                sig[arg] = types.get(arg, "i32")
        k = compile_kernel(fn, sig, const, warps or max(1, lanes // 32), divisible=div)
        label = f"selective_scan_{name}_bd{block}"
        if name == "bwd":
            label += f"_rows{rows_bwd}_sub{cfg.bwd_sub_chunk}"
        if extra["LOCAL"]:
            label += "_local"
        elif extra.get("HAS_INIT") or extra.get("HAS_CARRY"):
            label += "_carry"
        rows.append(report(k, label, sass_dir))
        if lines:
            rows[-1]["kernel"] = k
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sass", type=Path, default=None, help="write each kernel's SASS into this directory")
    p.add_argument("--lines", type=int, default=0, metavar="N",
                   help="also print each kernel's N source lines with the most SASS instructions")
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TritonConfig fields over the defaults, e.g. block_d_bwd=32 rows_bwd=2 sub_chunk_bwd=2")
    p.add_argument("--splits", action="store_true",
                   help="also the kernels a split sequence launches (local passes, main passes from a carry)")
    args = p.parse_args()
    config = {k: int(v) for k, v in (item.split("=") for item in args.config)}
    rows = _scan_rows(args.sass, args.lines, config, args.splits)
    print_reports(rows)
    for r in rows:
        if "kernel" in r:
            print_lines(r["kernel"], r["label"], args.lines)


if __name__ == "__main__":
    main()
