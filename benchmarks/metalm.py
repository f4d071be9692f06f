"""Training throughput of METALM (our SemiCausalLM task through Lightning's Trainer) against transformers'
LlamaForCausalLM of a similar size in a plain PyTorch loop, in the same process, on one GPU, bf16 autocast,
synthetic batch already on the GPU.

    python benchmarks/metalm.py --out metalm.json                         # metalm_1p3b vs Llama 1.36B, seq 2048
    python benchmarks/metalm.py --variants llama@4 ours+gc@8 ours+gc+compile@8
    python benchmarks/metalm.py --smoke                                   # tiny sizes, CPU, 2 steps: checks the script

Variants: ``llama`` (the anchor: ``LlamaForCausalLM``, 24 x 2048, 32 heads, intermediate 5632, SDPA attention,
untied embeddings: 1.36B parameters at vocabulary 32000; AdamW, autocast bf16) and ``ours`` (the task with
``metalm_1p3b``: decoder 24 x 2048 plus a 24 x 1024 span encoder, ``precision="bf16-mixed"``). Suffixes: ``+gc``
(activation checkpointing: HF's ``gradient_checkpointing_enable``; ours: per block in decoder and encoder),
``+compile`` (``torch.compile``: the whole Llama; our task compiles each block), ``+nospans`` (ours on the same
sequences without spans: the decoder alone, the encoder idle), ``@N`` (batch N sequences instead of
``--batch-size``). A variant that runs out of memory is reported as such and the next one runs.

Spans: drawn by the data pipeline's :class:`~mmpretrain.data.spans.SpanSampler` (64-128 tokens, 25% coverage) on
sequences of documents of 300-3000 tokens, collated as the data module does (``spans``, ``span_ids`` padded to
the longest span).

Per variant: median step time over the timed steps (after warm-up), tokens/s (``batch x seq``), peak memory and
MFU against the GPU's bf16 dense peak, with model FLOPs counted the way docs/benchmarks.md does for language
models (DESIGN.md): ``6 N tokens + 12 layers hidden seq tokens`` with ``N`` every parameter (embeddings
included), recomputation not counted. For ours both parts count: the decoder on all ``batch x seq`` tokens
(its tied embedding once) and the span encoder plus connector on the span tokens, its attention term over
each span's own length (``12 layers_e hidden_e sum(len^2)``). ``mfu_matmul`` leaves out the input-embedding
lookups (no matrix product: Llama's input table, our encoder's table); ``flops_counted`` is what
``FlopCounterMode`` measures on one forward and backward of our model (padding of spans, causal attention
counted whole), the figure the task reports to Lightning's throughput monitor.

Measured 2026-11-21 on one H200 (torch 2.11.0+cu130, vocabulary 32000 for both, 3 runs of this script in one
lease; metalm_1p3b is then 1.61B parameters):

=====================  =====  ========  =====  ========  ========
variant                batch  tokens/s  MFU    peak GiB  vs llama
=====================  =====  ========  =====  ========  ========
llama                  4      36455     34.6%  44.4      1.00x
llama+gc               8      31188     29.6%  26.1      0.86x
ours                   4      39289     37.2%  47.1      1.08x
ours+nospans           4      41488     37.1%  44.6      1.14x
ours+compile           4      49106     46.4%  46.3      1.35x
ours+compile           8      53817     50.9%  65.4      1.48x
ours+gc                8      33942     32.1%  32.8      0.93x
ours+gc+compile        8      41307     39.1%  32.8      1.13x
ours+gc+compile        16     43915     41.6%  41.4      1.20x
=====================  =====  ========  =====  ========  ========
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from typing import Any

import torch

LLAMA_1P3B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32)
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
OURS_SMOKE = dict(dim=64, layers=2, heads=4, encoder_dim=32, encoder_layers=2, encoder_heads=2)


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, span_min: int, span_max: int, doc_min: int,
                    doc_max: int, device: str) -> dict[str, torch.Tensor]:
    """Random tokens in packed documents, with spans drawn and collated as the text data module does."""
    from mmpretrain.data.spans import SpanSampler, collate_spans

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    sampler = SpanSampler(span_min, span_max, 0.25)
    doc_rows, span_rows = [], []
    for _ in range(batch_size):
        doc_ids: list[int] = []
        while len(doc_ids) < seq_len:
            doc_ids += [len(set(doc_ids))] * rng.randint(doc_min, doc_max)
        doc_ids = doc_ids[:seq_len]
        doc_rows.append(torch.tensor(doc_ids))
        span_rows.append(torch.tensor(sampler(doc_ids, rng), dtype=torch.long).view(-1, 2))
    batch = {"input_ids": input_ids, "doc_ids": torch.stack(doc_rows)}
    batch.update(collate_spans(span_rows, input_ids, pad_id=0))
    return {k: v.to(device) for k, v in batch.items()}


def ours_flops(overrides: dict[str, Any], preset: str, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Model FLOPs of one training step of ours by the LM convention (see the module docstring), and counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.models.metalm import create_metalm
    from mmpretrain.tasks.semicausal_lm import SemiCausalLM

    with torch.device("meta"):
        model = create_metalm(preset, **overrides)
    counts = model.parameter_counts()
    b, t = batch["input_ids"].shape
    spans = batch.get("spans")
    lengths = spans[:, 2].double().cpu() if spans is not None else torch.zeros(0, dtype=torch.float64)
    span_tokens = float(lengths.sum())
    enc = model.encoder
    enc_layers, enc_dim = len(enc.blocks), enc.dim
    decoder = 6 * counts["decoder"] * b * t + 12 * model.num_layers * model.dim * t * b * t
    encoder = 6 * (counts["encoder"] + counts["connector"]) * span_tokens \
        + 12 * enc_layers * enc_dim * float((lengths**2).sum())
    task = SemiCausalLM(preset=preset, overrides={k: v for k, v in overrides.items() if k != "vocab_size"},
                        vocab_size=overrides["vocab_size"])
    meta_batch = {k: v.to("meta") for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        task.compute_loss(model, meta_batch)["loss"].backward()
    return {
        "flops": decoder + encoder,
        "flops_matmul": decoder + encoder - 6 * counts["encoder_embedding"] * span_tokens,
        "flops_decoder": decoder,
        "flops_encoder": encoder,
        "flops_counted": float(counter.get_total_flops()),
        "params": counts["total"],
        "span_tokens": span_tokens,
        "spans": len(lengths),
        "span_width": int(batch["span_ids"].shape[1]) if spans is not None else 0,
    }


def llama_config(vocab: int, seq_len: int, smoke: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, max_position_embeddings=seq_len, tie_word_embeddings=False,
                       **(LLAMA_SMOKE if smoke else LLAMA_1P3B))


def llama_flops(config, batch_size: int, seq_len: int, params: int) -> dict[str, float]:
    tokens = batch_size * seq_len
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len * tokens
    return {"flops": 6 * params * tokens + attention,
            "flops_matmul": 6 * (params - config.vocab_size * config.hidden_size) * tokens + attention,
            "params": params}


def _timed(step, steps: int, warmup: int, device: str) -> list[float]:
    if device == "cuda":
        from timing import timed

        return timed(step, steps, warmup)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_llama(batch: dict[str, torch.Tensor], vocab: int, steps: int, warmup: int, gc: bool, compile: bool,
                smoke: bool, device: str) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    b, t = batch["input_ids"].shape
    config = llama_config(vocab, t, smoke)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.98), eps=1e-6, fused=device == "cuda")
    forward = torch.compile(model) if compile else model
    ids = batch["input_ids"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _timed(step, steps, warmup, device)
    params = sum(p.numel() for p in model.parameters())
    return {"step_s": statistics.median(times), **llama_flops(config, b, t, params)}


def bench_ours(batch: dict[str, torch.Tensor], preset: str, overrides: dict[str, Any], steps: int, warmup: int,
               gc: bool, compile: bool, device: str) -> dict[str, Any]:
    import lightning.pytorch as pl

    from mmpretrain.tasks.semicausal_lm import SemiCausalLM

    times: list[float] = []

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(warmup + steps):
                yield batch

    def optimizer(params):
        return torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                                 fused=device == "cuda")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            sync()
            times.append(time.perf_counter() - self.t0)

    vocab = overrides["vocab_size"]
    task = SemiCausalLM(preset=preset, overrides={k: v for k, v in overrides.items() if k != "vocab_size"},
                        vocab_size=vocab, bos_id=1, eos_id=2, pad_id=0, grad_checkpointing=gc, compile=compile,
                        optimizer=optimizer)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         precision="bf16-mixed" if device == "cuda" else "32-true", max_steps=warmup + steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(Batches(), batch_size=None))
    return {"step_s": statistics.median(times[warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="metalm_1p3b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step unless a variant says @N")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of both models (Llama's 32000)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--variants", nargs="+",
                        default=["llama@4", "llama+gc@8", "ours@4", "ours+gc@8", "ours+gc+compile@8"])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 2 steps: checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no GPU: run with --smoke to check the script on the CPU")
    overrides: dict[str, Any] = {"vocab_size": args.vocab}
    seq, span_min, span_max, doc_min, doc_max = args.seq_len, 64, 128, 300, 3000
    if args.smoke:
        overrides.update(OURS_SMOKE)
        seq, span_min, span_max, doc_min, doc_max = 128, 8, 16, 20, 200
        args.vocab = overrides["vocab_size"] = 512
        args.steps, args.warmup = 2, 1
        args.batch_size = 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        from timing import peak_flops

        peak = peak_flops()
    else:
        peak = float("nan")
    rows = []
    for variant in args.variants:
        match = re.search(r"@(\d+)", variant)
        b = 2 if args.smoke else int(match.group(1)) if match else args.batch_size
        gc, compile, nospans = "+gc" in variant, "+compile" in variant, "+nospans" in variant
        batch = synthetic_batch(b, seq, args.vocab, span_min, span_max, doc_min, doc_max, device)
        if nospans:
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "doc_ids")}
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"variant": variant, "batch": b, "seq_len": seq}
        try:
            if variant.startswith("llama"):
                row.update(bench_llama(batch, args.vocab, args.steps, args.warmup, gc, compile, args.smoke, device))
            else:
                row.update(ours_flops(overrides, args.preset, batch))
                row.update(bench_ours(batch, args.preset, overrides, args.steps, args.warmup, gc, compile, device))
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        tokens = b * seq
        row.update(tokens_per_s=tokens / row["step_s"], mfu=row["flops"] / row["step_s"] / peak,
                   mfu_matmul=row["flops_matmul"] / row["step_s"] / peak,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
                   device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
        if "flops_counted" in row:
            row["mfu_counted"] = row["flops_counted"] / row["step_s"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"].startswith("llama") and "error" not in r), None)
    print(f"\n{'variant':22} {'batch':>5} {'tokens/s':>10} {'MFU':>7} {'MFU mm':>7} {'peak GiB':>9} {'vs llama':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:22} {r['batch']:5} {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:8.2f}x" if base else f"{'-':>9}"
        print(f"{r['variant']:22} {r['batch']:5} {r['tokens_per_s']:10.0f} {100 * r['mfu']:6.1f}% "
              f"{100 * r['mfu_matmul']:6.1f}% {r['peak_gib']:9.1f} {ratio}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
