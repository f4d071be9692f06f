"""Training throughput of CLIP: our ContrastivePretraining task (through Lightning's Trainer) against open_clip
in a plain PyTorch loop, in the same process, on one GPU, bf16 autocast, synthetic batch already on the GPU.

    python benchmarks/clip.py --preset clip_vit_b16 --batch-size 256 --steps 20 --out clip.json
    python benchmarks/clip.py --variants open_clip ours ours+fused open_clip+gc ours+gc ours+accum2

Variants: ``open_clip`` (the anchor: ``open_clip.create_model("ViT-B-16")``, its ClipLoss, AdamW with its
no-decay groups, autocast bf16, logit scale clamp), ``ours`` (the task, ``precision="bf16-mixed"``); suffixes:
``+fused`` (fused AdamW), ``+gc`` (activation checkpointing in both), ``+compile`` (``torch.compile``),
``+accumN`` (ours only: the same batch in N micro-batches with exact accumulation: one extra forward pass
without gradient). Per variant: median step time over the timed steps (after warm-up), samples/s, MFU
(model FLOPs of one forward+backward of the whole batch counted with FlopCounterMode on the meta device,
recomputation not counted, over the step time and the bf16 dense peak) and peak memory. Prints a table and
writes JSON. open_clip is only needed for its variants (``pip install open_clip_torch``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from typing import Any

import torch
from timing import peak_flops, timed

OPEN_CLIP_NAMES = {"clip_vit_b16": "ViT-B-16", "clip_vit_b32": "ViT-B-32"}
VOCAB, CONTEXT, EOT = 49408, 77, 49407


def synthetic_batch(batch_size: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Images and CLIP-BPE-like token rows: [49406, ids..., 49407, 0...] with lengths 8..40."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(batch_size, CONTEXT, dtype=torch.long)
    lengths = torch.randint(8, 40, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = 49406
        tokens[i, 1:n] = torch.randint(1, 49405, (n - 1,), generator=g)
        tokens[i, n] = EOT
    return {"image": torch.randn(batch_size, 3, 224, 224, generator=g).to(device), "input_ids": tokens.to(device)}


def count_flops(preset: str, batch_size: int) -> int:
    """FLOPs of one forward+backward of our model on the whole batch (the same architecture as open_clip's)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.models.clip import create_clip
    from mmpretrain.models.losses import clip_loss_from_features

    batch = {k: v.to("meta") for k, v in synthetic_batch(batch_size, "cpu").items()}
    with torch.device("meta"):
        model = create_clip(preset, text_kwargs={"eot_id": EOT})
    with FlopCounterMode(display=False) as counter:
        img, txt, scale, _ = model(batch["image"], batch["input_ids"])
        clip_loss_from_features(img, txt, scale).backward()
    return counter.get_total_flops()


def bench_open_clip(preset: str, batch_size: int, steps: int, warmup: int, fused: bool, gc: bool,
                    compile: bool) -> dict[str, Any]:
    """The anchor: open_clip's model and loss in a plain loop, as its training script sets them up."""
    import open_clip

    model = open_clip.create_model(OPEN_CLIP_NAMES[preset], pretrained=None, device="cuda")
    if gc:
        model.set_grad_checkpointing(True)
    loss_fn = open_clip.ClipLoss()
    exclude = [p for n, p in model.named_parameters()
               if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    excluded = {id(p) for p in exclude}
    include = [p for p in model.parameters() if id(p) not in excluded]
    opt = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": include, "weight_decay": 0.2}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
    forward = torch.compile(model) if compile else model
    batch = synthetic_batch(batch_size)
    image, text = batch["image"], batch["input_ids"]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(image, text)
            image_features, text_features, logit_scale = out[:3] if isinstance(out, tuple) else (
                out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    torch.cuda.reset_peak_memory_stats()
    times = timed(step, steps, warmup)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_ours(preset: str, batch_size: int, steps: int, warmup: int, fused: bool, gc: bool, compile: bool,
               micro: int) -> dict[str, Any]:
    """Our task through Lightning's Trainer (bf16-mixed), the batch already on the GPU."""
    import lightning.pytorch as pl

    from mmpretrain.tasks.contrastive import ContrastivePretraining

    batch = synthetic_batch(batch_size)

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(warmup + steps):
                yield batch

    def optimizer(params):
        return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=fused)

    task = ContrastivePretraining(preset=preset, vocab_size=VOCAB, eot_id=EOT, grad_checkpointing=gc,
                                  compile=compile, accumulate_micro_batches=micro, optimizer=optimizer)
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Timer()])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(Batches(), batch_size=None))
    return {"step_s": statistics.median(times[warmup:]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="clip_vit_b16", choices=sorted(OPEN_CLIP_NAMES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["open_clip", "ours", "ours+fused", "open_clip+gc", "ours+gc",
                                                          "ours+accum2"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops()
    flops = count_flops(args.preset, args.batch_size)
    rows = []
    for variant in args.variants:
        torch.cuda.empty_cache()
        fused, gc, compile = "+fused" in variant, "+gc" in variant, "+compile" in variant
        accum = re.search(r"\+accum(\d+)", variant)
        if variant.startswith("open_clip"):
            r = bench_open_clip(args.preset, args.batch_size, args.steps, args.warmup, fused, gc, compile)
        else:
            r = bench_ours(args.preset, args.batch_size, args.steps, args.warmup, fused, gc, compile,
                           int(accum.group(1)) if accum else 1)
        r.update(preset=args.preset, variant=variant, batch=args.batch_size, samples_per_s=args.batch_size / r["step_s"],
                 mfu=flops / r["step_s"] / peak, flops_per_step=flops, device=torch.cuda.get_device_name(),
                 torch=torch.__version__)
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((b for b in rows if b["variant"] == "open_clip"), None)
    print(f"\n{'variant':18} {'samples/s':>10} {'MFU':>7} {'peak GiB':>9} {'vs open_clip':>13}")
    for r in rows:
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:12.2f}x" if base else f"{'-':>13}"
        print(f"{r['variant']:18} {r['samples_per_s']:10.0f} {100 * r['mfu']:6.1f}% {r['peak_gib']:9.1f} {ratio}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
