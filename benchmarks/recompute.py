"""Activation recomputation (``model.init_args.grad_checkpointing``): training step time and peak memory with and
without it, per model, in one process on one GPU (bf16 autocast, AdamW, synthetic batch already on the device,
median of the timed steps). Prints a table and writes JSON.

    python benchmarks/recompute.py --out docs/recompute.json                  # GPU: the sizes below
    python benchmarks/recompute.py --smoke                                    # CPU: tiny sizes, a few steps

Workloads (batch per GPU): classification vit_b16 (ViT-B/16 224 px, 256), CLIP vit_b16 (256 pairs), vim_tiny
(224 px, 128), METALM paper_1p3b decoder and span encoder (4 sequences of 2048). Recomputation is the tasks' own
switch (the Task base applies it), so what is measured is what a recipe gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mmpretrain.tasks.classification import ImageClassification
from mmpretrain.tasks.contrastive import ContrastivePretraining
from mmpretrain.tasks.semicausal_lm import SemiCausalLM


def workloads(smoke: bool) -> dict[str, tuple[Callable[[bool], Any], Callable[[torch.device], dict]]]:
    """name -> (task factory taking grad_checkpointing, batch factory taking the device)."""
    g = torch.Generator().manual_seed(0)
    if smoke:
        vit = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
        vim = {"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 2, "d_state": 4}
        size, n_img, n_clip, clip_preset, lm_preset, lm_len, n_lm, vocab = 32, 4, 4, "clip_demo", "metalm_demo", 32, 2, 64
        clip_size = 64
    else:
        vit, vim = {}, {}
        size, n_img, n_clip, clip_preset, lm_preset, lm_len, n_lm, vocab = 224, 256, 256, "clip_vit_b16", "metalm_1p3b", 2048, 4, 50304
        clip_size = 224
    n_vim = n_img if smoke else 128

    def images(n: int, s: int, device: torch.device) -> torch.Tensor:
        return torch.randn(n, 3, s, s, generator=g).to(device)

    def tokens(n: int, length: int, device: torch.device) -> torch.Tensor:
        return torch.randint(3, vocab - 1, (n, length), generator=g).to(device)

    def lm_batch(device: torch.device) -> dict:
        span = max(4, lm_len // 32)
        spans = torch.tensor([[r, lm_len // 4, span] for r in range(n_lm)])
        return {"input_ids": tokens(n_lm, lm_len, device), "spans": spans.to(device),
                "span_ids": tokens(n_lm, span, device)}

    return {
        "classification vit_b16": (
            lambda gc: ImageClassification(backbone="vit_tiny_patch16_224" if smoke else "vit_base_patch16_224",
                                           backbone_kwargs=vit, num_classes=1000, grad_checkpointing=gc),
            lambda d: {"image": images(n_img, size, d), "label": torch.randint(0, 1000, (n_img,), generator=g).to(d)}),
        "clip vit_b16": (
            lambda gc: ContrastivePretraining(preset=clip_preset, vocab_size=vocab, eot_id=vocab - 1, grad_checkpointing=gc),
            lambda d: {"image": images(n_clip, clip_size, d), "input_ids": tokens(n_clip, 12 if smoke else 77, d)}),
        "vim_tiny": (
            lambda gc: ImageClassification(backbone="vim_tiny", backbone_kwargs=vim, num_classes=1000, grad_checkpointing=gc),
            lambda d: {"image": images(n_vim, size, d), "label": torch.randint(0, 1000, (n_vim,), generator=g).to(d)}),
        "metalm paper_1p3b": (
            lambda gc: SemiCausalLM(preset=lm_preset, vocab_size=vocab, bos_id=1, eos_id=2, pad_id=0, grad_checkpointing=gc),
            lm_batch),
    }


def measure(make: Callable[[bool], Any], batch_fn: Callable, gc: bool, device: torch.device, steps: int,
            warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    task = make(gc)
    task.configure_model()
    task.to(device).train()
    batch = batch_fn(device)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-4, fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = task.compute_loss(task.model, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (a check that the script runs)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --smoke)")
    parser.add_argument("--only", default=None, help="run only workloads whose name contains this")
    parser.add_argument("--out", default="recompute.json", help="JSON file to write")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        parser.error("no CUDA device: run with --smoke on CPU")
    steps = args.steps or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name, (make, batch_fn) in workloads(args.smoke).items():
        if args.only and args.only not in name:
            continue
        row: dict[str, Any] = {"workload": name}
        for gc in (False, True):
            try:
                result = measure(make, batch_fn, gc, device, steps, warmup)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                result = {"step_s": float("nan"), "peak_gib": float("nan"), "oom": True}
            row["recompute" if gc else "plain"] = result
            if device.type == "cuda":
                torch.cuda.empty_cache()
        plain, rec = row["plain"], row["recompute"]
        row["time_ratio"] = rec["step_s"] / plain["step_s"]
        row["memory_ratio"] = rec["peak_gib"] / plain["peak_gib"] if plain["peak_gib"] == plain["peak_gib"] else None
        rows.append(row)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"activation recomputation, {device_name}, median of {steps} steps")
    print("| workload | step s | step s (recompute) | time x | peak GiB | peak GiB (recompute) | memory x |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p, q = r["plain"], r["recompute"]
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        print(f"| {r['workload']} | {p['step_s']:.4f} | {q['step_s']:.4f} | {r['time_ratio']:.2f} | {p['peak_gib']:.1f} | "
              f"{q['peak_gib']:.1f} | {mem} |")
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "date": time.strftime("%Y-%m-%d"), "steps": steps, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
