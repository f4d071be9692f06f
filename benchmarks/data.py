"""Throughput of the image-text (CLIP) data pipeline: per CPU core, across workers, end to end, and with
JPEG decoding on the GPU; and how many CPU cores it takes to feed a GPU.

    python benchmarks/data.py --out data.json                     # on a GPU machine: every section
    python benchmarks/data.py --smoke                             # CPU, seconds: checks the script runs
    python benchmarks/data.py --workers 1 2 4 8 16 --target 2950  # CLIP B/16 trains at ~2950 samples/s/H200

It writes its own shards first (``--data-dir``, reused when present): photo-like JPEGs (smooth colour fields,
edges, texture and sensor noise; 4:2:0, quality 90, like img2dataset output) with sides drawn from
``--min-size``..``--max-size`` and captions of 8-25 words, and a BPE tokenizer trained on the captions.

Sections (each a row of the table and the JSON):

- ``stage``: one process, one thread, no DataLoader: samples/s of each step of the worker's job on the
  shards' samples: ``decode`` (PIL, to RGB), ``augment`` (the CLIP train transform of recipes/clip/vit_b16:
  random-resized crop 0.9-1, bicubic, to tensor, normalise), ``tokenize`` (77 tokens), ``sample`` (all three,
  the data module's decoder) and ``plan`` (the worker's job with ``decode_device: cuda``: read the caption,
  tokenize, read the JPEG header and draw the crop). Samples/s per CPU core.
- ``workers``: the data module's DataLoader (``ImageTextDataModule``, batches made in the workers) with
  N worker processes, batches only (no device): samples/s, per worker, and the scaling efficiency against N
  times the 1-worker rate; for ``decode_device`` cpu and cuda (the latter: bytes and drawn crops only).
- ``end_to_end`` (CUDA): the same loader at the largest worker count, batches moved to the GPU (pinned,
  non-blocking) and, with ``decode_device: cuda``, decoded there by the data module's
  ``on_after_batch_transfer``: batches/s and samples/s as the training step would receive them.
- ``gpu_decode`` (CUDA): the device half alone on batches of encoded images already in host memory
  (nvJPEG batched decode + crop/resize/normalise): images/s, and the GPU milliseconds per batch.
- ``cores_needed``: worker cores per GPU for ``--target`` samples/s: the target over what one worker delivered
  at the largest worker count measured (everything included), for CPU and GPU decoding; ``ideal`` uses the
  single-core stage rate (``sample``, ``plan``) instead. With GPU decoding also the share of GPU time the
  decoding takes at the target rate. The main process needs a core of its own besides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from mmpretrain.data.decode import decode_image, image_member
from mmpretrain.data.gpu_decode import EncodedImageBatch, decode_batch
from mmpretrain.data.image_text import ImageTextDataModule, ImageTextDecoder
from mmpretrain.data.shards import iter_shard_samples
from mmpretrain.data.stream import seed_sample
from mmpretrain.data.tokenizer import train_bpe
from mmpretrain.data.writer import ShardWriter, read_index

# recipes/clip/vit_b16.yaml: open_clip's training transform
CLIP_TRAIN = {"scale": [0.9, 1.0], "interpolation": "bicubic", "hflip": 0.0, "color_jitter": 0.0}
_WORDS = ("a the of on in with and photo picture image view close up red blue green yellow white black small "
         "large old new wooden metal glass dog cat bird horse car bus train boat street city beach mountain "
         "forest river lake house table chair window door woman man child people group sitting standing "
         "walking running playing holding looking near next to under over behind front top side bright dark "
         "sunny cloudy evening morning night summer winter autumn spring colorful vintage modern kitchen room "
         "garden park field road bridge tree flowers sky water snow food plate cup bottle book phone computer")
WORDS = _WORDS.split()


# -- the data set -----------------------------------------------------------------------------------------------
def photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like image: smooth colour fields, shapes with edges, texture, blur and sensor noise (entropy and
    JPEG sizes like real photographs, not flat synthetic shapes)."""
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    base = base.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    texture = Image.fromarray(rng.integers(0, 256, (height // 4 + 1, width // 4 + 1), dtype=np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.BILINEAR), dtype=np.float32)[..., None] - 128
    arr = np.asarray(base, dtype=np.float32) + 0.25 * texture + rng.normal(0, 4, (height, width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 25)))


def make_data(directory: Path, samples: int, min_size: int, max_size: int, shard_size: int, seed: int) -> tuple[
        list[str], str]:
    """Shards of ``samples`` image-caption pairs and a tokenizer in ``directory`` (reused when present)."""
    index = read_index(directory) if directory.is_dir() else None
    spec = {"samples": samples, "min_size": min_size, "max_size": max_size, "seed": seed}
    if index is None or index.get("benchmark") != spec or not (directory / "tokenizer").is_dir():
        for old in directory.glob("*.tar") if directory.is_dir() else []:
            old.unlink()
        rng, crng = np.random.default_rng(seed), random.Random(seed)
        captions = []
        t0 = time.perf_counter()
        with ShardWriter(directory, prefix="bench", shard_size=shard_size, metadata={"benchmark": spec}) as w:
            for k in range(samples):
                h, wd = (int(s) for s in rng.integers(min_size, max_size + 1, 2))
                img = photo(rng, h, wd)
                buf = _jpeg(img)
                captions.append(caption(crng))
                w.write({"__key__": f"{k:08d}", "jpg": buf, "txt": captions[-1]})
        train_bpe(captions, 4096, directory / "tokenizer")
        print(f"wrote {samples} samples to {directory} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    urls = sorted(str(p) for p in directory.glob("bench-*.tar"))
    return urls, str(directory / "tokenizer")


def _jpeg(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=2)
    return buf.getvalue()


# -- measurements -----------------------------------------------------------------------------------------------
def per_sample_rate(fn, items: list, min_seconds: float) -> float:
    """Items per second of ``fn`` over ``items`` (repeated until ``min_seconds`` have passed)."""
    n, t0 = 0, time.perf_counter()
    while True:
        for it in items:
            fn(it)
        n += len(items)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return n / elapsed


def stage_rates(urls: list[str], dm: ImageTextDataModule, dev: ImageTextDataModule, limit: int,
                min_seconds: float) -> dict[str, float]:
    """Samples/s of each stage in one thread of this process."""
    samples = []
    for url in urls:
        samples.extend(iter_shard_samples(url))
        if len(samples) >= limit:
            break
    samples = samples[:limit]
    decoder: ImageTextDecoder = dm.process("train").decode
    planner_decoder: ImageTextDecoder = dev.process("train").decode
    rng = random.Random()
    images = [decode_image(image_member(s)) for s in samples]
    captions = [s["txt"].decode() for s in samples]
    counter = iter(range(1 << 62))

    def seeded(fn):
        def run(x):
            seed_sample(0, next(counter), rng)
            return fn(x)
        return run

    rates = {
        "decode": per_sample_rate(lambda s: decode_image(image_member(s)), samples, min_seconds),
        "augment": per_sample_rate(seeded(decoder.transform), images, min_seconds),
        "tokenize": per_sample_rate(lambda c: dm.tokenizer.encode_batch([c], dm.context_length), captions,
                                    min_seconds),
        "sample": per_sample_rate(seeded(lambda s: decoder(s, rng)), samples, min_seconds),
        "plan": per_sample_rate(seeded(lambda s: planner_decoder(s, rng)), samples, min_seconds),
    }
    rates["jpeg_kib"] = statistics.mean(len(image_member(s)) for s in samples) / 1024
    rates["pixels"] = statistics.mean(im.size[0] * im.size[1] for im in images)
    return rates


def loader_rate(dm: ImageTextDataModule, batches: int, warmup: int, device: str | None) -> dict[str, float]:
    """Batches/s and samples/s of the train loader (after ``warmup`` batches), optionally moved to ``device``
    and through the data module's ``on_after_batch_transfer``."""
    it = iter(dm.train_dataloader())
    n = samples = 0
    t0 = time.perf_counter()
    for i in range(warmup + batches):
        batch = next(it)
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch = dm.on_after_batch_transfer(batch, 0)
            torch.cuda.synchronize()
        if i == warmup - 1:
            t0 = time.perf_counter()
        if i >= warmup:
            n += 1
            samples += len(batch["key"])
    elapsed = time.perf_counter() - t0
    del it
    return {"batches_per_s": n / elapsed, "samples_per_s": samples / elapsed}


def gpu_decode_rate(dev: ImageTextDataModule, batch_size: int, repeats: int) -> dict[str, float]:
    """The device half alone: encoded batches already in host memory, decoded and transformed on the GPU."""
    loader = dev.train_dataloader()
    encoded: list[EncodedImageBatch] = []
    for batch in loader:
        encoded.append(batch["image"])
        if len(encoded) >= repeats:
            break
    decode_batch(encoded[0], "cuda", dev.mean, dev.std)  # warm-up: nvJPEG handles, kernels
    torch.cuda.synchronize()
    times = []
    for images in encoded:
        t0 = time.perf_counter()
        decode_batch(images, "cuda", dev.mean, dev.std)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"ms_per_batch": ms, "images_per_s": batch_size / ms * 1e3}


def data_module(urls: list[str], tokenizer: str, args, decode_device: str, workers: int) -> ImageTextDataModule:
    return ImageTextDataModule(
        train_shards=urls, tokenizer=tokenizer, context_length=77, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=workers, mode="resampled", samples_per_epoch=10**9,
        shuffle_buffer=args.shuffle_buffer, train_transform=CLIP_TRAIN, decode_device=decode_device,
        pin_memory=torch.cuda.is_available(), worker_start_method=args.start_method,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="where the shards go (default: a temporary folder)")
    parser.add_argument("--samples", type=int, default=2048, help="images written")
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to measure (default: 1 2 4 ... up to the CPU count)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader (default: 8 per worker, "
                        "at least 16)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--start-method", default="forkserver", choices=["forkserver", "spawn", "fork"])
    parser.add_argument("--stage-seconds", type=float, default=3.0, help="time spent on each single-core stage")
    parser.add_argument("--target", type=float, default=2950.0,
                        help="samples/s per GPU to feed (CLIP ViT-B/16 on one H200: ~2950, docs/benchmarks.md)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a few small images, 1 and 2 workers: seconds on a CPU")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.min_size, args.max_size, args.batch_size = 48, 256, 320, 8
        args.workers, args.batches, args.shuffle_buffer = [1, 2], 4, 8
        args.stage_seconds, args.start_method = 0.2, "fork"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= cpus]
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="mmpretrain-bench-data-"))
    cuda = torch.cuda.is_available()
    torch.set_num_threads(1)

    urls, tokenizer = make_data(data_dir, args.samples, args.min_size, args.max_size,
                                max(args.batch_size, min(1000, args.samples // 8)), seed=0)
    rows: list[dict[str, Any]] = []
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cpus": cpus, "torch": torch.__version__,
           "image_size": args.image_size, "batch_size": args.batch_size, "source_sizes": [args.min_size, args.max_size]}

    cpu_dm = data_module(urls, tokenizer, args, "cpu", 0)
    dev_dm = data_module(urls, tokenizer, args, "cuda", 0)
    stages = stage_rates(urls, cpu_dm, dev_dm, limit=min(args.samples, 256), min_seconds=args.stage_seconds)
    for name in ("decode", "augment", "tokenize", "sample", "plan"):
        rows.append({"section": "stage", "name": name, "samples_per_s_per_core": stages[name]})
    env.update(jpeg_kib=stages["jpeg_kib"], mean_pixels=stages["pixels"])

    rates: dict[tuple[str, int], float] = {}
    for decode_device in ("cpu", "cuda"):
        for w in workers:
            dm = data_module(urls, tokenizer, args, decode_device, w)
            batches = args.batches or max(16, 8 * w)
            r = loader_rate(dm, batches, warmup=2 * w + 2, device=None)
            rates[(decode_device, w)] = r["samples_per_s"]
            base = rates[(decode_device, workers[0])] / workers[0]
            rows.append({"section": "workers", "decode_device": decode_device, "workers": w, **r,
                         "samples_per_s_per_worker": r["samples_per_s"] / w,
                         "scaling_efficiency": r["samples_per_s"] / (base * w)})

    if cuda:
        w = workers[-1]
        for decode_device in ("cpu", "cuda"):
            dm = data_module(urls, tokenizer, args, decode_device, w)
            r = loader_rate(dm, args.batches or max(16, 8 * w), warmup=2 * w + 2, device="cuda")
            rows.append({"section": "end_to_end", "decode_device": decode_device, "workers": w, **r})
        g = gpu_decode_rate(data_module(urls, tokenizer, args, "cuda", min(4, w)), args.batch_size, repeats=8)
        rows.append({"section": "gpu_decode", "batch_size": args.batch_size, **g})

    w_max = workers[-1]
    for decode_device, stage in (("cpu", "sample"), ("cuda", "plan")):
        # measured: what one worker delivers at the largest worker count (reading, shuffling, IPC, collation
        # included); ideal: the stage rate of one core with nothing else to do
        per_worker = rates[(decode_device, w_max)] / w_max
        row = {"section": "cores_needed", "decode_device": decode_device, "target_samples_per_s": args.target,
               "workers_measured": w_max, "samples_per_s_per_core": per_worker,
               "cores_per_gpu": math.ceil(args.target / per_worker),
               "ideal_cores_per_gpu": math.ceil(args.target / stages[stage])}
        row["cores_per_node"] = row["cores_per_gpu"] * args.gpus_per_node
        gpu = next((r for r in rows if r["section"] == "gpu_decode"), None)
        if decode_device == "cuda" and gpu is not None:
            row["gpu_time_share"] = args.target / gpu["images_per_s"]
        rows.append(row)

    print_table(env, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)


def print_table(env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"# {env['device']}, {env['cpus']} CPUs, source images {env['source_sizes'][0]}-{env['source_sizes'][1]} px "
          f"(mean {env['mean_pixels'] / 1e3:.0f} kpixel, {env['jpeg_kib']:.0f} KiB), crop {env['image_size']}, "
          f"batch {env['batch_size']}")
    print(f"{'section':<12} {'what':<22} {'samples/s':>10} {'per core':>9} {'batches/s':>9} {'eff.':>6} {'other':>18}")
    for r in rows:
        s = r["section"]
        if s == "stage":
            print(f"{s:<12} {r['name']:<22} {'':>10} {r['samples_per_s_per_core']:>9.0f}")
        elif s in ("workers", "end_to_end"):
            what = f"decode {r['decode_device']}, {r['workers']} workers"
            per = r.get("samples_per_s_per_worker", float("nan"))
            eff = r.get("scaling_efficiency", float("nan"))
            print(f"{s:<12} {what:<22} {r['samples_per_s']:>10.0f} {per:>9.0f} {r['batches_per_s']:>9.2f} {eff:>6.2f}")
        elif s == "gpu_decode":
            print(f"{s:<12} {'batch ' + str(r['batch_size']):<22} {r['images_per_s']:>10.0f} {'':>9} "
                  f"{1e3 / r['ms_per_batch']:>9.2f} {'':>6} {r['ms_per_batch']:>14.1f} ms")
        elif s == "cores_needed":
            what = f"decode {r['decode_device']}"
            share = f"GPU {100 * r['gpu_time_share']:.1f}%" if "gpu_time_share" in r else ""
            print(f"{s:<12} {what:<22} {r['target_samples_per_s']:>10.0f} {r['samples_per_s_per_core']:>9.0f} "
                  f"{'':>9} {'':>6} {r['cores_per_gpu']:>4} cores/GPU (ideal {r['ideal_cores_per_gpu']}) {share}")


if __name__ == "__main__":
    main()
