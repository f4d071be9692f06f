"""The generated demo set: deterministic, counted right, decodable, balanced, safe to make concurrently."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.data import demo
from mmpretrain.data.demo import COLORS, POSITIONS, SHAPES, SIZES, DemoSizes, ensure_demo, read_manifest
from mmpretrain.data.shards import ShardError, expand_pattern, iter_shard_samples
from mmpretrain.data.tokenizer import Tokenizer
from mmpretrain.data.writer import read_index

ROOT = Path(__file__).resolve().parents[2]
SMALL = DemoSizes(image_size=48, train_shards=2, train_shard_size=40, val_shards=1, val_shard_size=24,
                  text_train_shards=2, text_train_shard_size=15, text_val_shards=1, text_val_shard_size=6,
                  vocab_size=400)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return ensure_demo(tmp_path_factory.mktemp("demo") / "set", seed=0, sizes=SMALL)


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def samples(root: Path, name: str) -> list[dict]:
    return [s for url in demo.demo_shards(name, root) for s in iter_shard_samples(url)]


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path, small_set: Path):
    again = ensure_demo(tmp_path / "again", seed=0, sizes=SMALL)
    first = files_of(small_set)
    assert files_of(again) == first
    assert {"demo.json", "images/index.json", "text/index.json", "tokenizer/tokenizer.json",
            "images/train-000001.tar", "images/val-000000.tar", "text/train-000001.tar", "text/val-000000.tar"} <= set(first)
    other = files_of(ensure_demo(tmp_path / "other", seed=1, sizes=SMALL))
    assert set(other) == set(first)
    for name in ("images/train-000000.tar", "images/val-000000.tar", "text/train-000000.tar", "text/val-000000.tar"):
        assert other[name] != first[name], name


def test_index_counts_match_the_tar_contents(small_set: Path):
    manifest = read_manifest(small_set)
    assert manifest["version"] == demo.DEMO_VERSION and manifest["seed"] == 0
    for name, (shards, per_shard) in SMALL.splits().items():
        kind = name.split("/")[0]
        index = read_index(small_set / kind)
        assert index["kind"] == ("image-text-label" if kind == "images" else "text")
        paths = demo.demo_shards(name, small_set)
        assert len(paths) == shards
        for path in map(Path, paths):
            assert index["shards"][path.name]["samples"] == per_shard == len(tar_keys(path))
    images = read_index(small_set / "images")
    assert images["classes"] == list(SHAPES) and all("{}" in t for t in images["templates"])


def test_images_decode_and_captions_describe_them(small_set: Path):
    for name in ("images/train", "images/val"):
        for s in samples(small_set, name):
            image = Image.open(io.BytesIO(s["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 48)
            meta = json.loads(s["json"])
            caption = s["txt"].decode()
            label = int(s["cls"])
            assert meta["label"] == label and meta["class_name"] == SHAPES[label] and meta["caption"] == caption
            assert SHAPES[label] in caption
            assert meta["color"] in COLORS and meta["size"] in SIZES and meta["position"] in POSITIONS
            assert meta["background"]


def test_pictures_differ_and_captions_vary(small_set: Path):
    train = samples(small_set, "images/train")
    assert len({s["jpg"] for s in train}) == len(train)
    captions = [s["txt"].decode() for s in train]
    assert len(set(captions)) > 0.8 * len(captions)
    # every caption names the colour and the shape; the other attributes at about their rates
    metas = [json.loads(s["json"]) for s in train]
    assert all(m["color"] in c.lower() and m["class_name"] in c for m, c in zip(metas, captions))
    many = [demo.caption(demo.sample_scene(demo._rng(1, i), i % 8), demo._rng(2, i)) for i in range(2000)]
    rates = {
        "size": sum(bool(re.search(r"\b(small|little|medium|mid-sized|large|big)\b", c)) for c in many) / 2000,
        "background": sum(("background" in c or "gradient" in c or "backdrop" in c) for c in many) / 2000,
    }
    for name, rate in rates.items():
        assert abs(rate - demo.CAPTION_MENTIONS[name]) < 0.05, (name, rate)


def test_classes_are_balanced():
    labels = [demo._labels(0, "train", i) for i in range(16000)]
    counts = Counter(labels)
    assert set(counts) == set(range(len(SHAPES))) and set(counts.values()) == {2000}
    attrs = [demo.sample_scene(demo._rng(0, i), 0) for i in range(2000)]
    for values, field in ((COLORS, "color"), (SIZES, "size"), (POSITIONS, "position")):
        counts = Counter(getattr(a, field) for a in attrs)
        assert set(counts) == set(values) and min(counts.values()) > 0.5 * 2000 / len(values), field
    kinds = Counter(a.background.kind for a in attrs)
    assert set(kinds) == {"solid", "gradient", "noise"} and min(kinds.values()) > 200


def test_shape_drawn_where_the_caption_says():
    # the shape's centre lies in the named third of the picture (positions are relative to where it fits)
    for i in range(300):
        scene = demo.sample_scene(demo._rng(5, i), i % len(SHAPES), 64)
        col = 0 if scene.position.endswith("left") else 2 if scene.position.endswith("right") else 1
        row = 0 if scene.position.startswith("top") else 2 if scene.position.startswith("bottom") else 1
        lo, hi = scene.radius + 1, 63 - scene.radius
        assert lo + (hi - lo) * col / 3 <= scene.cx <= lo + (hi - lo) * (col + 1) / 3
        assert lo + (hi - lo) * row / 3 <= scene.cy <= lo + (hi - lo) * (row + 1) / 3


def test_text_documents_vary_in_length_and_kind(small_set: Path):
    docs = [demo.text_document(0, "train", i)["txt"] for i in range(300)]
    words = [len(d.split()) for d in docs]
    assert min(words) < 60 and max(words) > 300 and 100 < sum(words) / len(words) < 300
    assert any("plus" in d or " + " in d for d in docs) and any("Counting" in d for d in docs)
    assert any("Who has the" in d or "What does" in d for d in docs) and any("In all there are" in d for d in docs)
    shard_docs = [s["txt"].decode() for s in samples(small_set, "text/train")]
    assert shard_docs == [demo.text_document(0, "train", i)["txt"] for i in range(len(shard_docs))]


def test_tokenizer_is_trained_on_the_set(small_set: Path):
    tok = Tokenizer.from_dir(small_set / "tokenizer")
    assert 300 < tok.vocab_size <= 400
    captions = [s["txt"].decode() for s in samples(small_set, "images/val")]
    assert all(tok.decode(tok.encode(c)) == c for c in captions)
    # merges learnt from the demo's words (only ~140 in this small vocabulary): far fewer tokens than bytes
    assert sum(len(tok.encode(c)) for c in captions) < 0.6 * sum(len(c) for c in captions)


def test_number_words():
    assert [demo.number_words(n) for n in (0, 13, 40, 42, 100, 115, 999, 1001, 23456)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred", "one hundred and fifteen",
        "nine hundred and ninety-nine", "one thousand and one", "twenty-three thousand four hundred and fifty-six"]


def test_existing_set_is_reused_and_mismatches_are_errors(small_set: Path, tmp_path: Path):
    mtime = (small_set / "demo.json").stat().st_mtime_ns
    assert ensure_demo(small_set, seed=0, sizes=SMALL) == small_set
    assert (small_set / "demo.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different demo set.*seed"):
        ensure_demo(small_set, seed=3, sizes=SMALL)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("x")
    with pytest.raises(ValueError, match="junk exists but holds no complete demo set"):
        ensure_demo(junk, sizes=SMALL)
    with pytest.raises(ShardError, match="unknown demo set 'demo:images/test'"):
        demo.demo_shards("images/test", small_set)


def test_losing_the_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch):
    root = tmp_path / "set"
    real = demo.generate_demo

    def generate_while_another_process_finishes_first(out, seed, sizes):
        real(out, seed, sizes)
        real(Path(str(out) + "-winner"), seed, sizes)
        Path(str(out) + "-winner").rename(root)  # the other process renames first

    monkeypatch.setattr(demo, "generate_demo", generate_while_another_process_finishes_first)
    assert ensure_demo(root, sizes=SMALL) == root
    assert read_manifest(root) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".set.lock", "set"]  # ours was discarded


SCRIPT = textwrap.dedent("""
    import contextlib, sys, time
    from pathlib import Path
    from mmpretrain.data import demo
    root, go, locked = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    if not locked:  # as on a file system without locks: both generate, the renames race
        demo._lock = lambda path: contextlib.nullcontext()
    sizes = demo.DemoSizes(image_size=32, train_shards=2, train_shard_size=60, val_shards=1, val_shard_size=20,
                           text_train_shards=1, text_train_shard_size=40, text_val_shards=1, text_val_shard_size=5,
                           vocab_size=300)
    deadline = time.time() + 60
    while not go.exists() and time.time() < deadline:
        time.sleep(0.005)
    print(demo.ensure_demo(root, sizes=sizes))
""")


@pytest.mark.parametrize("locked", [True, False], ids=["locked", "unlocked"])
def test_concurrent_ensure_demo_leaves_one_valid_set(tmp_path: Path, locked: bool):
    root, go = tmp_path / "cache" / "v1", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(go), str(int(locked))], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip() == str(root)
    manifest = read_manifest(root)
    assert manifest is not None
    for name, files in manifest["files"].items():
        kind = name.split("/")[0]
        index = read_index(root / kind)
        assert all(index["shards"][f]["samples"] == len(tar_keys(root / kind / f)) for f in files)
    assert sorted(p.name for p in root.parent.iterdir() if p.name != ".v1.lock") == ["v1"]  # no temporary left
    assert Tokenizer.from_dir(root / "tokenizer").vocab_size > 259


def test_full_default_set_through_the_cache_and_make_demo(tmp_path: Path, monkeypatch, capsys):
    """The one test that builds the default set: through ``make_demo`` into a fresh cache."""
    from data_tools import make_demo

    monkeypatch.setenv("MMPRETRAIN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "demo" / demo.DEMO_VERSION
    assert demo.demo_root() == root
    assert make_demo.main([]) == 0
    out = capsys.readouterr().out
    assert f"in {root}: written in" in out and "demo:images/train  8 shards, 16000 samples" in out
    assert make_demo.main([]) == 0 and "already there" in capsys.readouterr().out

    expected = {"images/train": (8, 2000), "images/val": (2, 250), "text/train": (4, 500), "text/val": (1, 250)}
    for name, (shards, per_shard) in expected.items():
        urls = expand_pattern(f"demo:{name}")  # as the data layer resolves it
        assert urls == demo.demo_shards(name) and len(urls) == shards
        index = read_index(Path(urls[0]).parent)
        assert [index["shards"][Path(u).name]["samples"] for u in urls] == [per_shard] * shards
    first = next(iter_shard_samples(demo.demo_shards("images/val")[0]))
    assert Image.open(io.BytesIO(first["jpg"])).size == (64, 64)
    labels = Counter(int(s["cls"]) for s in iter_shard_samples(demo.demo_shards("images/train")[0]))
    assert max(labels.values()) - min(labels.values()) <= 1

    tok = Tokenizer.from_dir("demo")
    assert tok.path == "demo" or Path(tok.path) == root / "tokenizer"
    assert demo.demo_tokenizer_dir() == root / "tokenizer"
    assert 1000 < tok.vocab_size <= 4096
    captions = [s["txt"].decode() for s in iter_shard_samples(demo.demo_shards("images/val")[0])]
    words = sum(len(c.split()) for c in captions)
    assert sum(len(tok.encode(c)) for c in captions) < 1.3 * words  # the demo's words are mostly single tokens
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    caption = first["txt"].decode()
    assert hf(caption)["input_ids"] == tok.encode(caption)



def test_make_demo_output_seed_force(tmp_path: Path, monkeypatch, capsys):
    import functools

    from data_tools import make_demo

    monkeypatch.setattr(make_demo, "ensure_demo", functools.partial(ensure_demo, sizes=SMALL))
    out = tmp_path / "seed1"
    assert make_demo.main(["--output", str(out), "--seed", "1"]) == 0
    assert f"(seed 1) in {out}: written" in capsys.readouterr().out
    before = files_of(out)
    (out / "images" / "train-000000.tar").write_bytes(b"damaged")
    assert make_demo.main(["--output", str(out), "--seed", "1"]) == 0 and "already there" in capsys.readouterr().out
    assert make_demo.main(["--output", str(out), "--seed", "1", "--force"]) == 0
    assert files_of(out) == before  # regenerated, byte for byte
    assert make_demo.main(["--output", str(out), "--seed", "2"]) == 1
    assert "different demo set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_demo.main(["--seed", "1"])  # the cache holds seed 0: another seed needs --output
    with pytest.raises(SystemExit) as exit_:
        make_demo.main(["--help"])
    assert exit_.value.code == 0 and "--force" in capsys.readouterr().out
