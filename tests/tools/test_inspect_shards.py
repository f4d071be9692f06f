"""inspect_shards: right counts and statistics on good shards; broken samples and shards listed, exit non-zero."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools import make_shards
from data_tools.inspect_shards import main
from mmpretrain.data.writer import ShardWriter


def jpeg(w: int, h: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def inspect(argv: list, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


@pytest.fixture
def good_set(tmp_path, capsys):
    """make_shards output: 3 classes (4, 2, 3 images of widths 10..18), shards of 4, plus a val split."""
    root = tmp_path / "imgs"
    n = 0
    for cls, count in (("a", 4), ("b", 2), ("c", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10 + n, 8), (n * 20, 0, 0)).save(root / cls / f"{i}.png")
            n += 1
    out = tmp_path / "shards"
    assert make_shards.main(["-i", str(root), "-o", str(out), "--shard-size", "3", "--log-every", "0"]) == 0
    capsys.readouterr()
    return out


def test_good_shards_report_right_counts(good_set, capsys):
    rc, out = inspect([good_set / "train-{000000..000002}.tar", "--json", "--decode"], capsys)
    assert rc == 0
    rep = json.loads(out)
    assert rep["ok"] and rep["kind"] == "image-label"
    t = rep["total"]
    assert t["shards"] == 3 and t["samples"] == 9 and t["index_samples"] == 9
    assert t["broken_samples"] == 0 and t["bad_shards"] == 0
    assert t["members"] == {"png": 9, "cls": 9, "json": 9}
    assert t["image_width"]["min"] == 10 and t["image_width"]["max"] == 18 and t["image_width"]["median"] == 14
    assert t["image_height"] == {"min": 8, "median": 8, "mean": 8, "max": 8}
    assert t["labels"] == {"0": {"class_name": "a", "count": 4}, "1": {"class_name": "b", "count": 2},
                           "2": {"class_name": "c", "count": 3}}
    assert [(s["samples"], s["index_samples"], s["status"]) for s in rep["shards"]] == [(3, 3, "ok")] * 3

    rc, text = inspect([good_set], capsys)  # a directory; the text report
    assert rc == 0 and "9 samples (index.json: 9)" in text and "0 broken samples" in text
    assert "a: 4" in text and text.rstrip().endswith("OK")

    rc, out = inspect([good_set, "--json", "--limit", "2"], capsys)
    t = json.loads(out)["total"]
    assert rc == 0 and t["samples"] == 6 and t["limited"]


def test_caption_and_text_lengths(tmp_path, capsys):
    with ShardWriter(tmp_path / "it", shard_size=10, metadata={"kind": "image-text"}) as w:
        for i, cap in enumerate(["a cat", "two black dogs", "x"]):
            w.write({"__key__": f"{i:06d}", "jpg": jpeg(8, 8), "txt": cap})
    rc, out = inspect([tmp_path / "it", "--json"], capsys)
    t = json.loads(out)["total"]
    assert rc == 0
    assert t["caption_chars"] == {"min": 1, "median": 5, "mean": 6.67, "max": 14}
    assert t["caption_words"] == {"min": 1, "median": 2, "mean": 2.0, "max": 3}
    assert t["labels"] is None

    with ShardWriter(tmp_path / "tx", shard_size=10, metadata={"kind": "text"}) as w:
        for i, doc in enumerate(["one two three", "four"]):
            w.write({"__key__": f"{i:06d}", "txt": doc})
    rc, out = inspect([tmp_path / "tx", "--json"], capsys)
    t = json.loads(out)["total"]
    assert rc == 0 and t["text_words"]["max"] == 3 and t["text_chars"]["min"] == 4


def write_faulty_set(tmp_path: Path) -> str:
    """Shard 0: a truncated JPEG (key 000001) and a sample without caption (key 000003); shard 1: a truncated tar."""
    good = jpeg(12, 9)
    with ShardWriter(tmp_path, prefix="train", shard_size=5, metadata={"kind": "image-text"}) as w:
        for i in range(10):
            sample = {"__key__": f"{i:06d}", "jpg": good, "txt": f"caption {i}"}
            if i == 1:
                sample["jpg"] = good[: len(good) * 2 // 3]
            if i == 3:
                del sample["txt"]
            w.write(sample)
    shard1 = tmp_path / "train-000001.tar"
    with tarfile.open(shard1) as tar:
        cut = tar.getmembers()[5].offset_data + 100  # inside a member's data: tarfile itself reports it
    shard1.write_bytes(shard1.read_bytes()[:cut])
    return str(tmp_path / "train-{000000..000001}.tar")


def test_broken_samples_and_truncated_shards_are_listed(tmp_path, capsys):
    pattern = write_faulty_set(tmp_path)
    rc, text = inspect([pattern, "--decode"], capsys)
    assert rc == 1
    assert "train-000000.tar key 000001: bad_image" in text
    assert "train-000000.tar key 000003: missing_caption" in text
    assert "train-000001.tar: truncated" in text
    assert "PROBLEMS FOUND" in text

    rc, out = inspect([pattern, "--decode", "--json"], capsys)
    rep = json.loads(out)
    assert rc == 1 and not rep["ok"]
    broken = {(Path(b["shard"]).name, b["key"]): b["problems"] for b in rep["broken_samples"]}
    assert set(broken) == {("train-000000.tar", "000001"), ("train-000000.tar", "000003")}
    assert broken["train-000000.tar", "000001"][0].startswith("bad_image")
    assert broken["train-000000.tar", "000003"][0].startswith("missing_caption")
    (bad,) = rep["bad_shards"]
    assert Path(bad["shard"]).name == "train-000001.tar" and bad["status"] == "truncated" and bad["error"]
    assert 0 < bad["samples"] < 5
    assert rep["total"]["broken_samples"] == 2 and rep["total"]["bad_shards"] == 1
    assert rep["shards"][0]["members"] == {"jpg": 5, "txt": 4}


def test_count_mismatch_empty_and_unreadable_shards(tmp_path, capsys):
    with ShardWriter(tmp_path, prefix="a", shard_size=4, metadata={"kind": "image-label", "classes": ["x"]}) as w:
        for i in range(4):
            w.write({"__key__": f"{i:06d}", "jpg": jpeg(4, 4), "cls": 0 if i else 5})  # key 000000: label 5
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"]["a-000000.tar"]["samples"] = 6
    (tmp_path / "index.json").write_text(json.dumps(index))
    tarfile.open(tmp_path / "b-000000.tar", "w").close()
    (tmp_path / "c-000000.tar").write_bytes(b"this is not a tar file at all" * 40)
    rc, out = inspect([tmp_path / "{a,b,c}-000000.tar", "--json"], capsys)
    rep = json.loads(out)
    assert rc == 1
    assert [s["status"] for s in rep["shards"]] == ["count_mismatch", "empty", "unreadable"]
    assert "index.json says 6" in rep["shards"][0]["error"]
    ((key, problems),) = [(b["key"], b["problems"]) for b in rep["broken_samples"]]
    assert key == "000000" and problems[0].startswith("bad_label")


def test_img2dataset_shards_without_index(tmp_path, capsys):
    """No index.json: the members most samples hold (jpg, txt) are expected of all."""
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            members = {"jpg": jpeg(6, 5), "json": json.dumps({"caption": f"c {i}"}).encode()}
            if i != 4:
                members["txt"] = f"c {i}".encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rc, out = inspect([shard, "--json"], capsys)
    rep = json.loads(out)
    assert rc == 1 and rep["total"]["samples"] == 6 and rep["total"]["index_samples"] is None
    assert rep["expected"] == {"image": "auto", "caption": "txt", "label": None}
    assert [b["key"] for b in rep["broken_samples"]] == ["000000004"]
    rc, out = inspect([shard, "--json", "--caption-key", "json:caption"], capsys)
    assert rc == 0 and json.loads(out)["total"]["caption_chars"]["max"] == 3


def test_a_pattern_that_matches_nothing_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "none-{000000..000003}.tar")]) == 2
    assert "none-000000.tar" in capsys.readouterr().err


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "data_tools.inspect_shards", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert "--decode" in out and "1 when broken samples or bad shards" in out
