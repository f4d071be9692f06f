"""Training throughput of image classification: our LightningModule (through Lightning's Trainer) against
timm in a plain PyTorch loop, in the same process, on one GPU, bf16 autocast, synthetic batch on the GPU.

    python benchmarks/classification.py --models vit_base_patch16_224 deit_small_patch16_224 deit_tiny_patch16_224 \
        --batch-size 256 --steps 30 --out results.json

Per configuration: median step time over the timed steps (after warm-up), samples/s, MFU (model FLOPs of
one forward+backward counted with FlopCounterMode, over the step time and the bf16 dense peak), peak
memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from timing import peak_flops, timed

import mmpretrain.models  # noqa: F401  (registers vim_* and our other models with timm)


def count_flops(model_name: str, batch_size: int, num_classes: int) -> int:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=num_classes)
        x = torch.empty(batch_size, 3, 224, 224)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def bench_timm(model_name: str, batch_size: int, steps: int, warmup: int, num_classes: int) -> dict[str, Any]:
    """The anchor: timm model, AdamW, bf16 autocast, a plain loop."""
    import timm

    model = timm.create_model(model_name, num_classes=num_classes).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    y = torch.randint(0, num_classes, (batch_size,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    times = timed(step, steps, warmup)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


class _StepTimer:
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args):
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def bench_ours(model_name: str, batch_size: int, steps: int, warmup: int, num_classes: int, compile: bool,
               fused: bool, compile_mode: str = "default") -> dict[str, Any]:
    """Our ImageClassification task through Lightning's Trainer (bf16-mixed), the batch already on the GPU."""
    import lightning.pytorch as pl

    from mmpretrain.tasks.classification import ImageClassification

    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    y = torch.randint(0, num_classes, (batch_size,), device="cuda")
    batch = {"image": x, "label": y}

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(warmup + steps):
                yield batch

    def optimizer(params):
        return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05, fused=fused)

    task = ImageClassification(backbone=model_name, num_classes=num_classes, compile=compile,
                               compile_mode=compile_mode, optimizer=optimizer)
    timer = _StepTimer()
    callback = type("Timer", (pl.Callback,), {"on_train_batch_start": timer.on_train_batch_start,
                                              "on_train_batch_end": timer.on_train_batch_end})()
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=loader)
    times = timer.times[warmup:]
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--variants", nargs="+", default=["timm", "ours", "ours+compile+fused"],
                        help="timm, ours; ours with +fused (fused AdamW), +compile, +autotune (compile with max-autotune), "
                             "+graphs (compile with reduce-overhead: CUDA graphs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops()
    rows = []
    for name in args.models:
        flops = count_flops(name, args.batch_size, args.num_classes)
        for variant in args.variants:
            torch.cuda.empty_cache()
            if variant == "timm":
                r = bench_timm(name, args.batch_size, args.steps, args.warmup, args.num_classes)
            else:
                r = bench_ours(name, args.batch_size, args.steps, args.warmup, args.num_classes,
                               compile="compile" in variant or "graphs" in variant, fused="fused" in variant,
                               compile_mode=("max-autotune-no-cudagraphs" if "autotune" in variant else
                                             "reduce-overhead" if "graphs" in variant else "default"))
            r.update(model=name, variant=variant, batch=args.batch_size,
                     samples_per_s=args.batch_size / r["step_s"], mfu=flops / r["step_s"] / peak,
                     flops_per_step=flops, device=torch.cuda.get_device_name(), torch=torch.__version__)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'model':26} {'variant':22} {'samples/s':>10} {'MFU':>7} {'peak GiB':>9} {'vs timm':>8}")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "timm")
        print(f"{r['model']:26} {r['variant']:22} {r['samples_per_s']:10.0f} {100 * r['mfu']:6.1f}% "
              f"{r['peak_gib']:9.1f} {r['samples_per_s'] / base['samples_per_s']:7.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
