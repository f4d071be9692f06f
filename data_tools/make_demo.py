"""Write the built-in demo set: coloured-shape images with captions and labels, a text corpus, a tokenizer.

    python -m data_tools.make_demo                      # into the cache, where demo: URLs read it
    python -m data_tools.make_demo --output demo/ --seed 1

Recipes never need this: ``demo:images/train`` (and ``demo:images/val``, ``demo:text/train``,
``demo:text/val``, tokenizer ``demo``) generate the set on first use. Use it to write the set somewhere
else, with another seed, or to replace a cached one (``--force``). The same seed always gives
byte-identical files. Layout of the output directory:

    images/train-00000{0..7}.tar  images/val-00000{0,1}.tar  images/index.json
    text/train-00000{0..3}.tar    text/val-000000.tar         text/index.json
    tokenizer/                    (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
    demo.json                     (version, seed, sizes and files; written last)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mmpretrain.data.demo import DEMO_VERSION, demo_root, ensure_demo, read_manifest
from mmpretrain.data.tokenizer import Tokenizer
from mmpretrain.data.writer import read_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.make_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", metavar="DIR",
                   help=f"directory to write (default: the cache, {demo_root()}, set by $MMPRETRAIN_CACHE)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the generator (default 0, the set demo: URLs use; another seed needs --output)")
    p.add_argument("--force", action="store_true", help="regenerate even when the directory already holds the set")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is None and args.seed != 0:
        parser.error("the cache holds the seed-0 set that demo: URLs read: give --output for another seed")
    root = Path(args.output) if args.output else demo_root()
    existed = read_manifest(root) is not None
    start = time.perf_counter()
    try:
        root = ensure_demo(root, seed=args.seed, force=args.force)
    except ValueError as err:
        print(f"make_demo: error: {err}", file=sys.stderr)
        return 1
    took = time.perf_counter() - start
    manifest = read_manifest(root)
    assert manifest is not None
    lines = []
    for name, files in manifest["files"].items():
        index = read_index(root / name.split("/")[0]) or {"shards": {}}
        samples = sum(index["shards"][f]["samples"] for f in files)
        lines.append(f"  demo:{name:<13} {len(files)} shards, {samples} samples")
    tok = Tokenizer.from_dir(root / "tokenizer")
    what = "already there (--force regenerates it)" if existed and not args.force else f"written in {took:.1f} s"
    print(f"demo set {DEMO_VERSION} (seed {manifest['seed']}) in {root}: {what}")
    print("\n".join(lines))
    print(f"  tokenizer          {root / 'tokenizer'} (vocabulary {tok.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
