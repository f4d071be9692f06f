"""Train a byte-level BPE tokenizer on the text of shards or of plain files.

    python -m data_tools.train_tokenizer --shards 'shards/train-{000000..000003}.tar' --key txt \\
        --vocab-size 8192 --output tok/
    python -m data_tools.train_tokenizer --shards 'shards/train-*.tar' --key json:caption --output tok/
    python -m data_tools.train_tokenizer --files corpus.txt more.jsonl --jsonl-field text --output tok/

The output directory holds ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``:
recipes take it as ``--data.tokenizer tok/``, and ``transformers.AutoTokenizer.from_pretrained("tok/")``
loads it. Special tokens: ``<|endoftext|>`` (id 0, end of text), ``<|startoftext|>`` (1, beginning of
text) and ``<|pad|>`` (2, padding). The same input and options give the same tokenizer.

Texts: from shards, the member or JSON field named by ``--key`` (a list of captions gives each one);
from ``.txt`` files (or any other suffix) every non-empty line; from ``.jsonl``/``.ndjson`` files the
``--jsonl-field`` of every record (a record that is a plain JSON string is taken whole).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmpretrain.data.decode import SkipSample, read_field
from mmpretrain.data.shards import ShardError, ShardReadError, expand_pattern, iter_shard_samples
from mmpretrain.data.tokenizer import Tokenizer, train_bpe


class InputError(ValueError):
    """Input that names nothing, or yields no text."""


def shard_texts(specs: Sequence[str], key: str, skipped: Counter) -> Iterator[str]:
    """Texts under ``key`` (``txt``, ``json:caption`` ...) of every sample of the shards; misses are counted."""
    for spec in specs:
        for url in expand_pattern(spec):
            for sample in iter_shard_samples(url):
                try:
                    value = read_field(sample, key, "text")
                except SkipSample as err:
                    skipped[err.reason] += 1
                    continue
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str) and text.strip():
                        yield text
                    else:
                        skipped["not_text"] += 1


def file_texts(paths: Sequence[str], jsonl_field: str, skipped: Counter) -> Iterator[str]:
    """Lines of text files; ``jsonl_field`` (dotted) of the records of .jsonl/.ndjson files."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"--files: {name} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise InputError(f"{name}:{line_no}: not JSON ({err})") from None
                    for part in jsonl_field.split(".") if not isinstance(value, str) else []:
                        value = value.get(part) if isinstance(value, dict) else None
                    if isinstance(value, str) and value.strip():
                        yield value
                    else:
                        skipped[f"no '{jsonl_field}' in {path.name}"] += 1
            else:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (at least one of --shards and --files)")
    src.add_argument("--shards", nargs="+", default=[], metavar="SPEC",
                     help="shard specifications: a brace pattern ('dir/train-{000000..000003}.tar', quoted), a glob, "
                          "a directory, a URL (pipe:, file:), or demo:text/train")
    src.add_argument("--key", default="txt", metavar="SPEC",
                     help="the text of a shard sample: a member ('txt') or a JSON field ('json:caption'); default txt")
    src.add_argument("--files", nargs="+", default=[], metavar="FILE",
                     help="plain text files (one text per line) and .jsonl/.ndjson files (one record per line)")
    src.add_argument("--jsonl-field", default="text", metavar="FIELD",
                     help="the field (dotted for nesting) holding the text in .jsonl records; default text")
    src.add_argument("--max-texts", type=int, metavar="N", help="train on the first N texts only")
    out = p.add_argument_group("tokenizer")
    out.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer into")
    out.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                     help="vocabulary size with the special tokens (default 8192); a small corpus may stop short of it")
    out.add_argument("--min-frequency", type=int, default=2, metavar="N",
                     help="the fewest occurrences of a pair of tokens for it to be merged (default 2)")
    out.add_argument("--model-max-length", type=int, metavar="N",
                     help="the context length recorded for transformers (default: none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.shards and not args.files:
        parser.error("give --shards, --files or both")
    if args.vocab_size < 259:
        parser.error("--vocab-size must be at least 259 (256 bytes and 3 special tokens)")
    if args.max_texts is not None and args.max_texts < 1:
        parser.error("--max-texts must be at least 1")
    output = Path(args.output)
    if (output / "tokenizer.json").exists():
        print(f"train_tokenizer: note: replacing the tokenizer in {output}", file=sys.stderr)
    skipped: Counter = Counter()
    stats = {"texts": 0, "chars": 0}

    def texts() -> Iterator[str]:
        sources = [shard_texts(args.shards, args.key, skipped), file_texts(args.files, args.jsonl_field, skipped)]
        for source in sources:
            for text in source:
                if args.max_texts is not None and stats["texts"] >= args.max_texts:
                    return
                stats["texts"] += 1
                stats["chars"] += len(text)
                yield text

    start = time.perf_counter()
    try:
        # expand the shard specifications first: a pattern that matches nothing fails before any training
        for spec in args.shards:
            expand_pattern(spec)
        stream = texts()
        first = next(stream, None)
        if first is None:
            _report_skipped(skipped)
            where = f"under key {args.key!r} of the shards" if args.shards else "in the files"
            print(f"train_tokenizer: error: no text found {where}; check --key / --jsonl-field", file=sys.stderr)
            return 1
        train_bpe(itertools.chain([first], stream), args.vocab_size, output, min_frequency=args.min_frequency,
                  model_max_length=args.model_max_length)
    except (ShardError, ShardReadError, InputError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    _report_skipped(skipped)
    tok = Tokenizer.from_dir(output)
    example = "a large red star in the top left corner"
    print(f"trained a byte-level BPE on {stats['texts']} texts ({stats['chars']} characters) in "
          f"{time.perf_counter() - start:.1f} s: vocabulary {tok.vocab_size} -> {output}")
    print(f"  {example!r} -> {len(tok.encode(example))} tokens")
    return 0


def _report_skipped(skipped: Counter) -> None:
    if skipped:
        print("train_tokenizer: skipped " + ", ".join(f"{n} ({reason})" for reason, n in skipped.most_common()),
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
