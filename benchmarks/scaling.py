"""Multi-GPU scaling: per-GPU throughput and memory of the real tasks through Lightning's Trainer, under torchrun.

Launch one run per (workload, strategy, GPU count) with torchrun; each run writes one JSON file (rank 0):

    torchrun --standalone --nproc-per-node 4 benchmarks/scaling.py --workload clip --strategy ddp \\
        --batch-size 256 --out results/scaling/clip-ddp-4.json
    torchrun --standalone --nproc-per-node 4 benchmarks/scaling.py --workload metalm --strategy deepspeed_stage_3 \\
        --batch-size 8 --recompute --out results/scaling/metalm-z3-gc-4.json
    python benchmarks/scaling.py --smoke              # CPU, gloo, 2 processes of a tiny model: checks the script
    bash benchmarks/scaling.sh                        # the whole matrix on 1, 2 and 4 GPUs, and the table

Workloads: ``clip`` (:class:`~mmpretrain.tasks.contrastive.ContrastivePretraining`, preset ``clip_vit_b16``, 224 px,
77 tokens, vocabulary 49408) and ``metalm`` (:class:`~mmpretrain.tasks.semicausal_lm.SemiCausalLM`, preset
``metalm_1p3b``, sequences of 2048 tokens with 25% spans, vocabulary 32000; the batch of benchmarks/metalm.py).
The batch is per GPU and fixed (weak scaling): N GPUs train N times the global batch. It is synthetic, made once
on each GPU (different on each rank) and handed to the Trainer by a loader that yields it again every step, so
the input pipeline is not measured (benchmarks/data.py measures it).

``--strategy`` is any of Lightning's strategy names (``ddp``, ``deepspeed_stage_2``, ``deepspeed_stage_3``,
``deepspeed_stage_2_offload`` ...), passed to ``Trainer(strategy=...)`` as the CLI does; ``--recompute`` turns on
the task's activation recomputation (``grad_checkpointing``). Precision is bf16-mixed on GPUs and 32-true on CPUs.

Per run: the median step time over the timed steps (each step synchronised at its start and end, after
``--warmup`` untimed ones), samples/s per GPU (and tokens/s per GPU for METALM), MFU per GPU against the bf16
dense peak (model FLOPs of one forward+backward of the per-GPU batch: METALM by the LM convention of
benchmarks/metalm.py, CLIP counted with FlopCounterMode; recomputation not counted), each rank's peak memory
and the memory held at the start of a steady-state step (parameters, gradients if kept, optimizer state: under
ZeRO-3 about 1/N of the whole). Scaling efficiency = per-GPU throughput on N GPUs / on 1 GPU (scaling.sh).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py and metalm.py beside this file

CLIP_VOCAB, CLIP_CONTEXT = 49408, 77
METALM_VOCAB = 32000
CLIP_SMOKE = dict(embed_dim=32, vision_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                  text_kwargs=dict(context_length=16, width=32, heads=2, layers=2))
METALM_SMOKE = dict(dim=64, layers=2, heads=4, encoder_dim=32, encoder_layers=2, encoder_heads=2)


# -- synthetic batches and model FLOPs ------------------------------------------------------------------------
def clip_batch(batch_size: int, image_size: int, context: int, vocab: int, seed: int, device: str) -> dict:
    """Images and token rows ``[bos, ids..., eot, 0 ...]`` of lengths 8..40 (capped by the context)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch_size, context, dtype=torch.long)
    lengths = torch.randint(min(8, context - 1), min(40, context - 1) + 1, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = vocab - 2
        tokens[i, 1:n] = torch.randint(1, vocab - 3, (n - 1,), generator=g)
        tokens[i, n] = vocab - 1  # the end-of-text id, where the text tower pools
    image = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return {"image": image.to(device), "input_ids": tokens.to(device)}


def clip_flops(preset: str, overrides: dict, batch: dict) -> dict[str, float]:
    """FLOPs of one forward+backward of the per-GPU batch (the loss on the local batch), counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmpretrain.models.clip import create_clip
    from mmpretrain.models.losses import clip_loss_from_features

    vocab = int(batch["input_ids"].max()) + 1
    text = {**overrides.get("text_kwargs", {}), "vocab_size": vocab, "eot_id": vocab - 1}
    with torch.device("meta"):
        model = create_clip(preset, **{**overrides, "text_kwargs": text})
    meta = {k: v.to("meta") for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        image, txt, scale, _ = model(meta["image"], meta["input_ids"])
        clip_loss_from_features(image, txt, scale).backward()
    return {"flops": float(counter.get_total_flops()), "params": float(sum(p.numel() for p in model.parameters()))}


def make_workload(args: argparse.Namespace, rank: int, device: str) -> tuple[Any, dict, dict[str, float], int]:
    """(task, per-GPU batch, model FLOPs and parameters, tokens per sample or 0)."""
    if args.workload == "clip":
        from mmpretrain.tasks.contrastive import ContrastivePretraining

        overrides = CLIP_SMOKE if args.smoke else {}
        image_size = CLIP_SMOKE["vision_kwargs"]["img_size"] if args.smoke else 224
        context = CLIP_SMOKE["text_kwargs"]["context_length"] if args.smoke else CLIP_CONTEXT
        vocab = 512 if args.smoke else CLIP_VOCAB
        batch = clip_batch(args.batch_size, image_size, context, vocab, seed=rank, device=device)
        task = ContrastivePretraining(preset=args.preset or ("clip_demo" if args.smoke else "clip_vit_b16"),
                                      overrides=overrides, vocab_size=vocab, eot_id=vocab - 1,
                                      grad_checkpointing=args.recompute)
        flops = clip_flops(task.preset, overrides, {k: v.cpu() for k, v in batch.items()})
        return task, batch, flops, 0

    from metalm import ours_flops, synthetic_batch

    from mmpretrain.tasks.semicausal_lm import SemiCausalLM

    preset = args.preset or ("metalm_demo" if args.smoke else "metalm_1p3b")
    seq_len = 64 if args.smoke else args.seq_len
    vocab = 512 if args.smoke else METALM_VOCAB
    overrides = {**(METALM_SMOKE if args.smoke else {}), **json.loads(args.overrides or "{}"), "vocab_size": vocab}
    if args.smoke:
        overrides["max_seq_len"] = seq_len
    torch.manual_seed(rank)  # synthetic_batch seeds its own generators: offset the tokens per rank below
    span = (4, 8) if args.smoke else (64, 128)
    docs = (16, 48) if args.smoke else (300, 3000)
    batch = synthetic_batch(args.batch_size, seq_len, vocab, *span, *docs, device="cpu")
    batch["input_ids"] = (batch["input_ids"] + 7 * rank - 3) % (vocab - 3) + 3
    flops = ours_flops(overrides, preset, batch)
    task = SemiCausalLM(preset=preset, overrides={k: v for k, v in overrides.items() if k != "vocab_size"},
                        vocab_size=vocab, bos_id=1, eos_id=2, pad_id=0, grad_checkpointing=args.recompute,
                        compile=args.compile)
    return task, {k: v.to(device) for k, v in batch.items()}, flops, seq_len


# -- the run ----------------------------------------------------------------------------------------------------
class Repeat(torch.utils.data.IterableDataset):
    """The same batch, ``steps`` times."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    import lightning.pytorch as pl
    from timing import peak_flops

    cuda = torch.cuda.is_available() and not args.cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", max(world // per_node, 1)))
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    task, batch, flops, tokens_per_sample = make_workload(args, rank, device)
    times: list[float] = []
    resident: list[int] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync()
            if cuda and batch_idx == args.warmup:  # steady state: parameters, gradients kept, optimizer state
                resident.append(torch.cuda.memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync()
            times.append(time.perf_counter() - self.t0)

    strategy = args.strategy if world > 1 or args.strategy.startswith("deepspeed") else "auto"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=per_node, num_nodes=nodes, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true", max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(Repeat(batch, args.warmup + args.steps), batch_size=None)
    trainer.fit(task, train_dataloaders=loader)

    step_s = statistics.median(times[args.warmup:])
    per_rank = {
        "step_s": step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "resident_gib": resident[0] / 2**30 if resident else None,
    }
    gathered = [per_rank] * world
    if world > 1 and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, per_rank)
        # meet before leaving: a rank that tears gloo down while its peer is still in a collective aborts the peer
        # ("terminate called without an active exception", tests/distributed.py)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    slowest = max(r["step_s"] for r in gathered)  # a synchronous step lasts as long as its slowest rank
    samples = args.batch_size / slowest
    peak = peak_flops() if cuda else float("nan")
    result: dict[str, Any] = {
        "workload": args.workload, "preset": task.preset, "strategy": args.strategy, "recompute": args.recompute,
        "compile": args.compile,
        "gpus": world, "nodes": nodes, "per_gpu_batch": args.batch_size, "global_batch": args.batch_size * world,
        "steps": args.steps, "warmup": args.warmup, "step_s": slowest,
        "samples_per_s_per_gpu": samples, "samples_per_s": samples * world,
        "tokens_per_s_per_gpu": samples * tokens_per_sample if tokens_per_sample else None,
        "model_flops_per_gpu_step": flops["flops"], "params": flops["params"],
        "mfu": flops["flops"] / slowest / peak if peak == peak else None,
        "peak_gib_per_rank": [r["peak_gib"] for r in gathered],
        "resident_gib_per_rank": [r["resident_gib"] for r in gathered],
        "step_s_per_rank": [r["step_s"] for r in gathered],
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "lightning": pl.__version__, "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    return result


def print_row(r: dict[str, Any]) -> None:
    tokens = f"{r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, " if r["tokens_per_s_per_gpu"] else ""
    mfu = f"MFU {100 * r['mfu']:.1f}%, " if r["mfu"] is not None else ""
    peak = max((p for p in r["peak_gib_per_rank"] if p is not None), default=None)
    mem = f"peak {peak:.1f} GiB/GPU" if peak is not None else "peak n/a (CPU)"
    print(f"{r['workload']} {r['strategy']}{' +recompute' if r['recompute'] else ''} on {r['gpus']} "
          f"({r['nodes']} node{'s' if r['nodes'] > 1 else ''}): {r['samples_per_s_per_gpu']:.1f} samples/s/GPU, "
          f"{tokens}{mfu}{mem}; step {1000 * r['step_s']:.1f} ms", flush=True)


def smoke(out: str | None) -> int:
    """Both workloads, tiny, on 2 CPU processes (gloo) under torchrun: the script runs end to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    directory = Path(out) if out else Path("scaling-smoke")
    directory.mkdir(parents=True, exist_ok=True)
    for workload in ("clip", "metalm"):
        path = directory / f"{workload}-ddp-2.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--workload", workload, "--strategy", "ddp", "--batch-size", "4", "--steps", "2", "--warmup", "1",
               "--cpu", "--tiny", "--out", str(path)]
        done = subprocess.run(cmd, env=env, timeout=600)
        if done.returncode != 0:
            return done.returncode
        result = json.loads(path.read_text())
        assert result["gpus"] == 2 and result["samples_per_s_per_gpu"] > 0, result
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["clip", "metalm"], default="clip")
    parser.add_argument("--preset", default=None, help="default: clip_vit_b16 / metalm_1p3b")
    parser.add_argument("--strategy", default="ddp", help="a Lightning strategy name")
    parser.add_argument("--recompute", action="store_true", help="activation recomputation (grad_checkpointing)")
    parser.add_argument("--compile", action="store_true", help="METALM: torch.compile each block (model.compile)")
    parser.add_argument("--overrides", default=None,
                        help='METALM: JSON of model arguments over the preset, e.g. \'{"dim": 5120, "layers": 40}\'')
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU; default 256 (clip) / 4 (metalm)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None, help="the run's JSON file (with --smoke: a directory)")
    parser.add_argument("--smoke", action="store_true",
                        help="launch both workloads, tiny, on 2 CPU processes under torchrun, and check the JSON")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # what --smoke runs per workload
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even where CUDA is available")
    args = parser.parse_args()
    if args.smoke and "LOCAL_RANK" not in os.environ:
        raise SystemExit(smoke(args.out))
    args.smoke = args.smoke or args.tiny
    if args.batch_size is None:
        args.batch_size = 256 if args.workload == "clip" else 4
    result = run(args)
    if result is None:
        return
    print_row(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
