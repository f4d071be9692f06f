"""Check webdataset shards and summarise what they hold.

    python -m data_tools.inspect_shards 'shards/train-{000000..000009}.tar'
    python -m data_tools.inspect_shards shards/ --decode --json > report.json

Per shard and in total: samples read (against index.json when the directory has one), member extensions,
image sizes (from the image headers; every image is fully decoded with --decode), caption or document
lengths (characters and words), the label histogram, and what is broken: samples with a missing or
undecodable image, a missing caption, text or label, or a label outside the classes; shards that are
unreadable, truncated, empty, or hold another number of samples than index.json says.

Which members a sample must have comes from index.json's kind (image-label: image and cls; image-text:
image and txt; text: txt), else from what most of the first samples hold; --image-key, --caption-key,
--label-key and --text-key name them explicitly (an extension or a JSON field such as json:caption).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from PIL import Image

from mmpretrain.data.decode import SkipSample, decode_image, image_member, read_label, read_text
from mmpretrain.data.shards import (
    ShardError,
    expand_pattern,
    iter_shard_samples,
    read_index_metadata,
    shard_sample_counts,
)

MAX_LISTED = 1000  # broken samples kept in the report (the counts are always complete)
PEEK = 50  # samples looked at to guess the expected members when index.json gives no kind


@dataclass
class Expect:
    """Field specs of the members every sample must have (None: not required)."""

    image: str | None = None
    caption: str | None = None  # caption of an image, or a text document
    label: str | None = None
    text_name: str = "caption"  # "caption" or "text", for the report
    label_optional: str | None = None  # checked when present (image-text with classes), not required


@dataclass
class ShardReport:
    url: str
    index_samples: int | None = None
    samples: int = 0
    status: str = "ok"  # ok, empty, truncated, unreadable, count_mismatch
    error: str | None = None
    limited: bool = False
    first_key: str | None = None
    last_key: str | None = None
    members: Counter = field(default_factory=Counter)
    broken: int = 0
    broken_samples: list[dict[str, Any]] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "samples": self.samples, "index_samples": self.index_samples, "status": self.status,
                "error": self.error, "limited": self.limited, "first_key": self.first_key, "last_key": self.last_key,
                "broken_samples": self.broken,
                "members": dict(sorted(self.members.items()))}


def iter_samples(url: str, report: ShardReport):
    """The shard's samples; a read error ends them and is kept in ``report.error``."""

    def on_error(_url: str, err: Exception) -> None:
        report.error = f"{type(err).__name__}: {err}"

    return iter_shard_samples(url, on_shard_error=on_error)


def guess_expect(urls: Sequence[str], meta: dict[str, Any], args: argparse.Namespace) -> Expect:
    """The members samples must have: from explicit keys, index.json's kind, or the first samples."""
    kind = meta.get("kind")
    e = Expect()
    if kind == "image-label":
        e.image, e.label = "auto", "cls"
    elif kind in ("image-text", "image-text-label"):
        e.image, e.caption = "auto", "txt"
        e.label_optional = "cls" if meta.get("classes") else None
    elif kind == "text":
        e.caption, e.text_name = "txt", "text"
    else:
        seen: Counter = Counter()
        n = 0
        for url in urls:
            probe = ShardReport(url)
            for sample in islice(iter_samples(url, probe), PEEK):
                n += 1
                seen.update(_roles(sample))
            if n >= PEEK:
                break
        has = {role for role, c in seen.items() if c * 2 > n}
        e.image = "auto" if "image" in has else None
        e.caption = "txt" if "txt" in has else None
        e.text_name = "caption" if e.image else "text"
        e.label = "cls" if "cls" in has else None
    if args.image_key:
        e.image = args.image_key
    if args.caption_key:
        e.caption, e.text_name = args.caption_key, "caption"
    if args.text_key:
        e.caption, e.text_name = args.text_key, "text"
    if args.label_key:
        e.label, e.label_optional = args.label_key, None
    return e


def _roles(sample: dict) -> set[str]:
    roles = set()
    try:
        image_member(sample)
        roles.add("image")
    except SkipSample:
        pass
    roles.update(k for k in ("txt", "cls") if k in sample)
    return roles


def inspect_shard(url: str, expect: Expect, classes: list[str] | None, args: argparse.Namespace,
                  index_samples: int | None) -> ShardReport:
    report = ShardReport(url, index_samples)
    class_to_index = {name: i for i, name in enumerate(classes or [])}
    samples = iter_samples(url, report)
    for sample in samples:
        if args.limit is not None and report.samples >= args.limit:
            report.limited = True
            break
        report.samples += 1
        report.first_key = report.first_key or sample["__key__"]
        report.last_key = sample["__key__"]
        report.members.update(k for k in sample if not k.startswith("__"))
        problems = check_sample(sample, expect, class_to_index, classes, args.decode, report)
        if problems:
            report.broken += 1
            if len(report.broken_samples) < MAX_LISTED:
                report.broken_samples.append({"shard": url, "key": sample["__key__"], "problems": problems})
    if report.limited:
        samples.close()
    if report.error is not None:
        report.status = "truncated" if report.samples else "unreadable"
    elif report.samples == 0:
        report.status = "empty"
    elif not report.limited and index_samples is not None and index_samples != report.samples:
        report.status = "count_mismatch"
        report.error = f"index.json says {index_samples} samples, the shard holds {report.samples}"
    return report


def check_sample(sample: dict, expect: Expect, class_to_index: dict[str, int], classes: list[str] | None,
                 decode: bool, report: ShardReport) -> list[str]:
    """Adds the sample's statistics to ``report``; returns its problems (``"reason: detail"``)."""
    problems = []
    if expect.image is not None:
        try:
            data = image_member(sample, expect.image)
            if decode:
                img = decode_image(data)
                size = img.size
            else:  # the header only: cheap, and catches what is not an image at all
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        size = img.size
                except (OSError, ValueError, SyntaxError) as err:
                    raise SkipSample("bad_image", f"{type(err).__name__}: {err}") from None
            report.widths.append(size[0])
            report.heights.append(size[1])
        except SkipSample as err:
            problems.append(str(err))
    if expect.caption is not None:
        try:
            text = read_text(sample, expect.caption, what=expect.text_name)
            report.chars.append(len(text))
            report.words.append(len(text.split()))
        except SkipSample as err:
            problems.append(str(err))
    label_spec = expect.label or (expect.label_optional if expect.label_optional in sample else None)
    if label_spec is not None:
        try:
            label = read_label(sample, label_spec, class_to_index)
            if label < 0 or (classes is not None and label >= len(classes)):
                raise SkipSample("bad_label", f"{label} is outside the {len(classes or [])} classes of index.json")
            report.labels[label] += 1
        except SkipSample as err:
            problems.append(str(err))
    return problems


# ------------------------------------------------------------------------------------------------ report
def stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 2),
            "max": max(values)}


def build_report(reports: list[ShardReport], expect: Expect, meta: dict[str, Any]) -> dict[str, Any]:
    classes = meta.get("classes")
    members: Counter = Counter()
    labels: Counter = Counter()
    for r in reports:
        members.update(r.members)
        labels.update(r.labels)
    known = [r.index_samples for r in reports]
    bad_shards = [{"shard": r.url, "status": r.status, "samples": r.samples, "error": r.error}
                  for r in reports if r.status != "ok"]
    broken = [b for r in reports for b in r.broken_samples][:MAX_LISTED]
    total = {
        "shards": len(reports),
        "samples": sum(r.samples for r in reports),
        "index_samples": sum(known) if known and all(k is not None for k in known) else None,
        "limited": any(r.limited for r in reports),
        "broken_samples": sum(r.broken for r in reports),
        "bad_shards": len(bad_shards),
        "members": dict(members.most_common()),
        "image_width": stats([w for r in reports for w in r.widths]),
        "image_height": stats([h for r in reports for h in r.heights]),
        f"{expect.text_name}_chars": stats([c for r in reports for c in r.chars]),
        f"{expect.text_name}_words": stats([w for r in reports for w in r.words]),
        "labels": {str(k): {"class_name": classes[k] if classes and 0 <= k < len(classes) else None, "count": c}
                   for k, c in sorted(labels.items())} or None,
    }
    return {
        "kind": meta.get("kind"),
        "expected": {"image": expect.image, expect.text_name: expect.caption, "label": expect.label},
        "ok": not bad_shards and total["broken_samples"] == 0,
        "total": total,
        "shards": [r.summary() for r in reports],
        "bad_shards": bad_shards,
        "broken_samples": broken,
    }


def format_report(rep: dict[str, Any], max_shard_lines: int = 50) -> str:
    t = rep["total"]
    lines = []
    shards = rep["shards"]
    listed = shards if len(shards) <= max_shard_lines else [s for s in shards if s["status"] != "ok" or s["broken_samples"]]
    width = max([len(s["url"]) for s in listed] + [5])
    lines.append(f"{'shard':<{width}}  {'samples':>8}  {'index':>8}  {'broken':>6}  {'status':<14}  members")
    for s in listed:
        idx = "-" if s["index_samples"] is None else str(s["index_samples"])
        status = s["status"] + (" (limit)" if s["limited"] else "")
        mem = ", ".join(f"{k} {v}" for k, v in s["members"].items())
        lines.append(f"{s['url']:<{width}}  {s['samples']:>8}  {idx:>8}  {s['broken_samples']:>6}  {status:<14}  {mem}")
    if len(listed) < len(shards):
        lines.append(f"({len(shards) - len(listed)} good shards not listed; --json lists all)")
    lines.append("")
    idx = "" if t["index_samples"] is None else f" (index.json: {t['index_samples']})"
    lim = ", limited by --limit" if t["limited"] else ""
    lines.append(f"total: {_plural(t['shards'], 'shard')}, {_plural(t['samples'], 'sample')}{idx}{lim}; "
                 f"{_plural(t['broken_samples'], 'broken sample')}, {_plural(t['bad_shards'], 'bad shard')}")
    lines.append("members: " + (", ".join(f"{k} {v}" for k, v in t["members"].items()) or "none"))
    if t["image_width"]:
        w, h = t["image_width"], t["image_height"]
        lines.append(f"image size: width {w['min']}/{w['median']:g}/{w['max']}, "
                     f"height {h['min']}/{h['median']:g}/{h['max']} (min/median/max)")
    for name in ("caption", "text"):
        c, wd = t.get(f"{name}_chars"), t.get(f"{name}_words")
        if c:
            lines.append(f"{name} length: characters {c['min']}/{c['median']:g}/{c['mean']:g}/{c['max']}, "
                         f"words {wd['min']}/{wd['median']:g}/{wd['mean']:g}/{wd['max']} (min/median/mean/max)")
    if t["labels"]:
        items = [f"{k}{' ' + v['class_name'] if v['class_name'] is not None else ''}: {v['count']}"
                 for k, v in t["labels"].items()]
        shown = ", ".join(items[:40]) + (f", ... ({len(items)} labels)" if len(items) > 40 else "")
        lines.append(f"labels: {shown}")
    if rep["bad_shards"]:
        lines.append("")
        lines.append(f"bad shards ({len(rep['bad_shards'])}):")
        for b in rep["bad_shards"]:
            lines.append(f"  {b['shard']}: {b['status']} after {b['samples']} samples: {b['error'] or ''}".rstrip(": "))
    if rep["broken_samples"]:
        lines.append("")
        lines.append(f"broken samples ({t['broken_samples']}):")
        for b in rep["broken_samples"][:50]:
            lines.append(f"  {b['shard']} key {b['key']}: {'; '.join(b['problems'])}")
        if t["broken_samples"] > 50:
            lines.append(f"  ... and {t['broken_samples'] - 50} more (--json lists up to {MAX_LISTED})")
    lines.append("")
    lines.append("OK" if rep["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.inspect_shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when every shard and sample is sound; 1 when broken samples or bad shards were found "
               "(listed in the report); 2 when the shard specification matches nothing or the arguments are wrong.")
    p.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="shard specifications: a brace pattern ('dir/train-{000000..000003}.tar', quoted), a glob, "
                        "a directory, or URLs (pipe:, file:); several are read one after another")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead of text")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully (finds truncated and corrupt images; slower). Without it only "
                        "the image header is read")
    p.add_argument("--limit", type=int, metavar="N",
                   help="read at most N samples of each shard (counts are then not compared with index.json)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="shards read at the same time (default: min(8, CPUs))")
    keys = p.add_argument_group("members (default: from index.json's kind, else what most samples hold)")
    keys.add_argument("--image-key", metavar="EXT", help="image member extension, or 'auto' (the first image extension)")
    keys.add_argument("--caption-key", metavar="SPEC", help="caption: 'txt' or a JSON field such as 'json:caption'")
    keys.add_argument("--text-key", metavar="SPEC", help="document text of text shards: 'txt' or 'json:text'")
    keys.add_argument("--label-key", metavar="SPEC", help="label: 'cls' or a JSON field such as 'json:label'")
    return p


def inspect(specs: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    urls = [u for spec in specs for u in expand_pattern(spec)]
    meta = read_index_metadata(urls)
    counts = shard_sample_counts(urls, scan_local=False)
    expect = guess_expect(urls, meta, args)
    classes = meta.get("classes")
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        reports = list(pool.map(lambda uc: inspect_shard(uc[0], expect, classes, args, uc[1]), zip(urls, counts)))
    return build_report(reports, expect, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        rep = inspect(args.shards, args)
    except (ShardError, ValueError) as err:  # a pattern that matches nothing, an unreadable index.json
        print(f"inspect_shards: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
