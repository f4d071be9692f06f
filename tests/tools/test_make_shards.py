"""make_shards: folder trees, caption tables, parquet and text become shards that read back sample for sample."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.make_shards import choose_val, main
from mmpretrain.data.classification import ImageLabelDataModule
from mmpretrain.data.decode import decode_image, image_member, read_label, read_text
from mmpretrain.data.shards import expand_pattern, iter_shard_samples, shard_sample_counts
from mmpretrain.data.writer import read_index


def save(img: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def read_all(directory: Path, prefix: str = "train") -> list[dict]:
    urls = expand_pattern(str(directory / f"{prefix}-*.tar"))
    return [s for url in urls for s in iter_shard_samples(url)]


def run(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv] + ["--log-every", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def class_tree(tmp_path):
    """3 classes with 5, 3 and 4 images in jpg/png/webp (one nested, one upper-case extension)."""
    root = tmp_path / "imgs"
    files = {}
    n = 0
    for cls, count in (("cat", 5), ("ant", 3), ("dog", 4)):
        for i in range(count):
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][n % 3]
            sub = "sub/" if i == 2 else ""
            name = f"{cls}/{sub}img{i}.{ext.upper() if i == 1 else ext}"
            files[name] = save(noise(20 + n, 12 + i, n), root / name, fmt)
            n += 1
    (root / "README.txt").write_text("not an image")  # ignored
    (root / "dog" / "notes.txt").write_text("not an image either")
    return root, files


def test_class_folder_reads_back_sample_for_sample(tmp_path, class_tree, capsys):
    root, files = class_tree
    out = tmp_path / "shards"
    rc, stdout, _ = run(["--input", root, "--output", out, "--shard-size", 5, "--workers", 3], capsys)
    assert rc == 0, stdout
    index = read_index(out)
    assert index["kind"] == "image-label"
    assert index["classes"] == ["ant", "cat", "dog"]
    assert {k: v["samples"] for k, v in index["shards"].items()} == {
        "train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 2}
    urls = expand_pattern(str(out / "train-*.tar"))
    assert shard_sample_counts(urls) == [5, 5, 2]
    assert [sum(1 for _ in iter_shard_samples(u)) for u in urls] == [5, 5, 2]

    samples = read_all(out)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == sorted(files)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 12 and all(k.isdigit() and len(k) == 6 for k in keys)
    for s in samples:
        meta = json.loads(s["json"])
        original = files[meta["source"]].read_bytes()
        ext = {".jpg": "jpg", ".png": "png", ".webp": "webp"}[Path(meta["source"]).suffix.lower()]
        assert s[ext] == original  # the original bytes, under the format's extension
        assert np.array_equal(np.asarray(decode_image(image_member(s))), np.asarray(decode_image(original)))
        class_name = meta["source"].split("/")[0]
        assert meta["class_name"] == class_name
        assert int(s["cls"]) == meta["label"] == index["classes"].index(class_name)
        assert read_label(s, "cls") == meta["label"]
    # the records were shuffled (one class per shard otherwise), keys lead back to sorted input order
    by_key = {s["__key__"]: json.loads(s["json"])["source"] for s in samples}
    assert [by_key[k] for k in sorted(by_key)] == sorted(files, key=lambda p: (p.split("/")[0], p))
    assert keys != sorted(keys)
    assert "12 image-label samples" in stdout

    # the classification data module reads the output as it is
    dm = ImageLabelDataModule(val_shards=str(out / "train-{000000..000002}.tar"), image_size=16, batch_size=4,
                              num_workers=0)
    assert dm.num_classes == 3 and dm.class_names == ["ant", "cat", "dog"]
    labels = [int(x) for b in dm.val_dataloader() for x in b["label"]]
    assert sorted(labels) == sorted(index["classes"].index(p.split("/")[0]) for p in files)
    assert dm.stats["val"].skipped_samples == 0


def test_output_does_not_depend_on_workers(tmp_path, class_tree, capsys):
    root, _ = class_tree
    for w in (1, 4):
        assert run(["-i", root, "-o", tmp_path / f"w{w}", "--workers", w, "--val-fraction", 0.25], capsys)[0] == 0
    for name in ("train-000000.tar", "val-000000.tar", "index.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w4" / name).read_bytes()


@pytest.mark.parametrize("columns", [("image", "caption"), ("filepath", "title")])
def test_caption_csv_reads_back(tmp_path, capsys, columns):
    imgs = tmp_path / "data" / "imgs"
    captions = ["a red square", 'a "quoted", comma, caption', "ünïcödé — 字幕", "multi\nline"]
    rows = []
    for i, cap in enumerate(captions * 2):
        save(noise(16, 10 + i, i), imgs / f"{i}.jpg", "JPEG")
        rows.append({columns[0]: f"imgs/{i}.jpg", columns[1]: cap, "source_url": f"http://x/{i}", "n": i})
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    rc, _, err = run(["-i", table, "--image-root", tmp_path / "data", "-o", out, "--shard-size", 3], capsys)
    assert rc == 0, err
    assert f"image={columns[0]!r}" in err and f"caption={columns[1]!r}" in err
    index = read_index(out)
    assert index["kind"] == "image-text" and "classes" not in index
    assert [v["samples"] for v in index["shards"].values()] == [3, 3, 2]
    samples = read_all(out)
    assert len(samples) == 8
    for s in samples:
        assert set(s) - {"__key__", "__url__"} == {"jpg", "txt", "json"}  # img2dataset's layout
        i = int(s["__key__"])
        meta = json.loads(s["json"])
        assert meta == {"source": f"imgs/{i}.jpg", "source_url": f"http://x/{i}", "n": str(i)}
        assert s["jpg"] == (imgs / f"{i}.jpg").read_bytes()
        assert np.array_equal(np.asarray(decode_image(s["jpg"])), np.asarray(Image.open(imgs / f"{i}.jpg")))
        assert read_text(s, "txt") == captions[i % 4].strip()
        assert s["txt"].decode() == captions[i % 4]


def test_table_with_label_column_writes_cls_and_classes(tmp_path, capsys):
    rows = []
    for i, name in enumerate(["zebra", "ant", "zebra", "", "moth"]):
        save(noise(8, 8, i), tmp_path / f"{i}.png", "PNG")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"photo {i}", "label": name}))
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    rc, _, err = run(["-i", tmp_path / "t.jsonl", "-o", tmp_path / "out", "--no-shuffle"], capsys)
    assert rc == 0, err
    index = read_index(tmp_path / "out")
    assert index["kind"] == "image-text" and index["classes"] == ["ant", "moth", "zebra"]
    samples = {s["__key__"]: s for s in read_all(tmp_path / "out")}
    assert [int(samples[k]["cls"]) for k in ("000000", "000001", "000004")] == [2, 0, 1]
    assert "cls" not in samples["000003"]  # no label: the pair is kept without one
    assert json.loads(samples["000000"]["json"])["class_name"] == "zebra"

    # the same table as image-label: the unlabelled row is skipped
    rc, _, err = run(["-i", tmp_path / "t.jsonl", "-o", tmp_path / "lab", "--kind", "image-label",
                      "--caption-column", "caption"], capsys)
    assert rc == 0 and "missing_label 1" in err
    assert read_index(tmp_path / "lab")["kind"] == "image-label"
    assert len(read_all(tmp_path / "lab")) == 4


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("LA", "PNG"), ("1", "BMP"), ("RGB", "TIFF"), ("RGB", "GIF")])
def test_any_image_mode_is_accepted_and_decodes_to_rgb(tmp_path, capsys, mode, fmt):
    root = tmp_path / "imgs"
    img = noise(13, 9, 0).convert(mode) if mode != "I;16" else Image.fromarray(
        np.arange(13 * 9, dtype=np.uint16).reshape(9, 13) * 500)
    path = save(img, root / "only" / f"x.{fmt.lower()}", fmt)
    rc, _, err = run(["-i", root, "-o", tmp_path / "out"], capsys)
    assert rc == 0 and "skipped" not in err, err
    (s,) = read_all(tmp_path / "out")
    data = image_member(s)
    assert data == path.read_bytes()
    rgb = decode_image(data)
    assert rgb.mode == "RGB" and rgb.size == (13, 9)

    # and with --max-image-size they become RGB JPEGs of the requested longer side
    rc, _, _ = run(["-i", root, "-o", tmp_path / "small", "--max-image-size", 6], capsys)
    (s,) = read_all(tmp_path / "small")
    assert rc == 0 and set(s) - {"__key__", "__url__"} == {"jpg", "cls", "json"}
    small = Image.open(io.BytesIO(s["jpg"]))
    assert small.format == "JPEG" and small.mode == "RGB" and small.size == (6, 4)


def test_max_image_size_keeps_small_images_as_they_are(tmp_path, capsys):
    big = save(noise(40, 20, 1), tmp_path / "imgs" / "a" / "big.png", "PNG")
    small = save(noise(10, 5, 2), tmp_path / "imgs" / "a" / "small.png", "PNG")
    rc, _, _ = run(["-i", tmp_path / "imgs", "-o", tmp_path / "out", "--max-image-size", 16], capsys)
    assert rc == 0
    by_source = {json.loads(s["json"])["source"]: s for s in read_all(tmp_path / "out")}
    assert by_source["a/small.png"]["png"] == small.read_bytes()
    assert Image.open(io.BytesIO(by_source["a/big.png"]["jpg"])).size == (16, 8)
    assert big.exists()


def write_table_with_bad_rows(tmp_path: Path) -> Path:
    for i in range(4):
        save(noise(8, 8, i), tmp_path / f"{i}.jpg", "JPEG")
    good = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    table = tmp_path / "pairs.tsv"
    table.write_text("image\tcaption\n0.jpg\tzero\nmissing.jpg\tgone\n2.jpg\ttruncated\n3.jpg\tthree\n1.jpg\t \n")
    return table


def test_missing_and_broken_images_are_skipped_and_counted(tmp_path, capsys):
    table = write_table_with_bad_rows(tmp_path)
    rc, out, err = run(["-i", table, "-o", tmp_path / "out"], capsys)
    assert rc == 0
    assert "skipped 3 of 5 records" in err
    assert "missing_image 1" in err and "bad_image 1" in err and "missing_caption 1" in err
    assert "missing.jpg" in err and "2.jpg" in err
    assert "skipped 3" in out
    assert sorted(s["txt"].decode() for s in read_all(tmp_path / "out")) == ["three", "zero"]
    assert sum(v["samples"] for v in read_index(tmp_path / "out")["shards"].values()) == 2


def test_strict_fails_naming_the_file(tmp_path, capsys):
    table = write_table_with_bad_rows(tmp_path)
    rc, _, err = run(["-i", table, "-o", tmp_path / "out", "--strict", "--no-shuffle", "--workers", 1], capsys)
    assert rc == 1
    assert "missing.jpg" in err and "no such file" in err


def test_text_documents_from_jsonl_txt_files_and_lines(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    lines = [{"text": "first document", "id": 1}, {"text": "   "}, {"text": "second\nwith a newline", "id": 2},
             {"text": "third ✓", "meta": {"src": "x"}}]
    (docs / "a.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    rc, _, err = run(["-i", docs / "a.jsonl", "-o", tmp_path / "j", "--no-shuffle"], capsys)
    assert rc == 0 and "missing_text 1" in err
    assert read_index(tmp_path / "j")["kind"] == "text"
    samples = read_all(tmp_path / "j")
    assert [s["txt"].decode() for s in samples] == ["first document", "second\nwith a newline", "third ✓"]
    assert [s["__key__"] for s in samples] == ["000000", "000002", "000003"]
    assert json.loads(samples[0]["json"]) == {"id": 1} and json.loads(samples[2]["json"]) == {"meta": {"src": "x"}}

    (docs / "b.txt").write_text("a whole file\nis one document\n")
    (docs / "c.txt").write_text("another file")
    rc, _, _ = run(["-i", docs / "b.txt", docs / "c.txt", "-o", tmp_path / "t", "--no-shuffle"], capsys)
    assert rc == 0
    assert [s["txt"].decode() for s in read_all(tmp_path / "t")] == ["a whole file\nis one document", "another file"]

    rc, _, _ = run(["-i", docs / "b.txt", "-o", tmp_path / "l", "--split-lines", "--no-shuffle"], capsys)
    assert [s["txt"].decode() for s in read_all(tmp_path / "l")] == ["a whole file", "is one document"]

    rc, _, _ = run(["-i", docs, "-o", tmp_path / "d", "--kind", "text"], capsys)  # a folder of text files
    assert rc == 0 and len(read_all(tmp_path / "d")) == 5


def test_parquet_tables(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    paths = [save(noise(9, 7, i), tmp_path / "im" / f"{i}.webp", "WEBP") for i in range(5)]
    table = pa.table({"file_path": [f"im/{i}.webp" for i in range(5)], "text": [f"cap {i}" for i in range(5)],
                      "label": [3, 0, 3, 1, None], "score": [0.5, float("nan"), 1.0, 2.0, 3.0]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    rc, _, err = run(["-i", tmp_path / "pairs.parquet", "-o", tmp_path / "out", "--label-column", "label"], capsys)
    assert rc == 0, err
    index = read_index(tmp_path / "out")
    assert index["kind"] == "image-text" and index["classes"] == ["0", "1", "2", "3"]  # integer labels
    for s in read_all(tmp_path / "out"):
        i = int(s["__key__"])
        assert s["webp"] == paths[i].read_bytes() and s["txt"].decode() == f"cap {i}"
        assert ("cls" in s) == (i != 4)
        if i != 4:
            assert int(s["cls"]) == [3, 0, 3, 1][i]
        assert json.loads(s["json"])["score"] == (None if i == 1 else [0.5, None, 1.0, 2.0, 3.0][i])

    # images stored in the table itself (Hugging Face datasets' {"bytes", "path"}) and a text table
    blobs = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    pq.write_table(pa.table({"image": blobs, "caption": [f"c{i}" for i in range(5)]}), tmp_path / "blobs.parquet")
    rc, _, _ = run(["-i", tmp_path / "blobs.parquet", "-o", tmp_path / "blobs"], capsys)
    assert rc == 0 and sorted(s["webp"] for s in read_all(tmp_path / "blobs")) == sorted(p.read_bytes() for p in paths)
    pq.write_table(pa.table({"content": ["doc one", "doc two"], "id": [7, 8]}), tmp_path / "docs.parquet")
    rc, _, _ = run(["-i", tmp_path / "docs.parquet", "-o", tmp_path / "docs", "--no-shuffle"], capsys)
    assert rc == 0 and read_index(tmp_path / "docs")["kind"] == "text"
    assert [(s["txt"], json.loads(s["json"])) for s in read_all(tmp_path / "docs")] == [
        (b"doc one", {"id": 7}), (b"doc two", {"id": 8})]


def test_val_fraction_gives_disjoint_splits_covering_the_input(tmp_path, capsys):
    root = tmp_path / "imgs"
    for c in range(4):
        for i in range(5 + c):
            save(noise(6, 6, 10 * c + i), root / f"class{c}" / f"{i}.png", "PNG")
    n = sum(5 + c for c in range(4))
    args = ["-i", root, "--shard-size", 4, "--val-fraction", 0.25, "--seed", 3]
    assert run([*args, "-o", tmp_path / "a"], capsys)[0] == 0
    train, val = read_all(tmp_path / "a", "train"), read_all(tmp_path / "a", "val")
    src = lambda samples: {json.loads(s["json"])["source"] for s in samples}  # noqa: E731
    assert len(val) == round(n * 0.25) and len(train) + len(val) == n
    assert not src(train) & src(val)
    assert src(train) | src(val) == {p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    assert not {s["__key__"] for s in train} & {s["__key__"] for s in val}
    assert {int(s["cls"]) for s in val} == {0, 1, 2, 3}  # stratified: every class in validation
    index = read_index(tmp_path / "a")
    assert sum(v["samples"] for k, v in index["shards"].items() if k.startswith("val-")) == len(val)

    assert run([*args, "-o", tmp_path / "b"], capsys)[0] == 0  # the same seed: the same shards
    for p in sorted((tmp_path / "a").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert run([*args[:-1], 4, "-o", tmp_path / "c"], capsys)[0] == 0
    assert src(read_all(tmp_path / "c", "val")) != src(val)


def test_choose_val_counts():
    assert choose_val(10, 0.0, 0).sum() == 0
    assert choose_val(1000, 0.1, 0).sum() == 100
    labels = np.repeat(np.arange(7), [1, 2, 3, 50, 60, 70, 14])
    mask = choose_val(len(labels), 0.1, 5, labels)
    assert mask.sum() == round(len(labels) * 0.1)
    # quotas 0.1 0.2 0.3 5 6 7 1.4: floors give 19, the largest remainder (class 6's 0.4) the 20th
    assert np.bincount(labels[mask], minlength=7).tolist() == [0, 0, 0, 5, 6, 7, 2]


def test_existing_shards_are_not_mixed_with_new_ones(tmp_path, class_tree, capsys):
    root, _ = class_tree
    out = tmp_path / "out"
    assert run(["-i", root, "-o", out, "--shard-size", 2], capsys)[0] == 0
    rc, _, err = run(["-i", root, "-o", out, "--shard-size", 5], capsys)
    assert rc == 1 and "--overwrite" in err
    assert run(["-i", root, "-o", out, "--shard-size", 5, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(read_index(out)["shards"]) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_input_errors_name_what_is_wrong(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("url,caption\nhttp://x/1.jpg,a\n")
    rc, _, err = run(["-i", tmp_path / "t.csv", "-o", tmp_path / "o"], capsys)
    assert rc == 1 and "'url'" in err and "img2dataset" in err
    (tmp_path / "u.csv").write_text("a,b\n1,2\n")
    rc, _, err = run(["-i", tmp_path / "u.csv", "-o", tmp_path / "o"], capsys)
    assert rc == 1 and "--kind" in err and "a, b" in err
    rc, _, err = run(["-i", tmp_path / "u.csv", "-o", tmp_path / "o", "--image-column", "nope"], capsys)
    assert rc == 1 and "'nope'" in err
    rc, _, err = run(["-i", tmp_path / "nothing", "-o", tmp_path / "o"], capsys)
    assert rc == 1 and "nothing" in err


def test_img2dataset_shards_read_as_they_are(tmp_path):
    """A shard laid out as img2dataset writes it (9-digit keys, jpg/txt/json, a _stats.json, no index)."""
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            noise(8, 6, i).save(buf, format="JPEG")
            members = {"jpg": buf.getvalue(), "txt": f"caption {i}".encode(),
                       "json": json.dumps({"caption": f"caption {i}", "url": f"http://x/{i}", "key": f"{i:09d}"}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    samples = list(iter_shard_samples(str(shard)))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [read_text(s, "txt") for s in samples] == [read_text(s, "json:caption") for s in samples]
    assert decode_image(image_member(samples[0])).size == (8, 6)
    assert shard_sample_counts([str(shard)]) == [3]


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "data_tools.make_shards", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert "--val-fraction" in out and "image-label" in out and "Exit status" in out
