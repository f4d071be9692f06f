"""Make webdataset shards from local files: an image folder tree, a table of image paths and captions, or text.

    python -m data_tools.make_shards --input imgs/ --output shards/ --val-fraction 0.05
    python -m data_tools.make_shards --input captions.csv --image-root imgs/ --output shards/
    python -m data_tools.make_shards --input corpus.jsonl --output shards/ --kind text

What a sample holds, by kind (recorded as ``kind`` in ``index.json``, with ``classes`` when labelled):

- ``image-label`` (a folder tree ``ROOT/<class>/<image>``, or a table of image path + label): the image
  member (the original bytes; the extension is that of the image's format: ``jpg``, ``png``, ``webp`` ...),
  ``cls`` (the class index; classes sorted by name) and ``json`` ``{"label", "class_name", "source"}``.
- ``image-text`` (a CSV/TSV/parquet/JSONL table of image path + caption): the image, ``txt`` (the caption)
  and ``json`` (``source``: the image path as the table gives it, plus the table's other columns); with a
  label column also ``cls`` and ``label``/``class_name`` in ``json``.
- ``text`` (JSONL documents, ``.txt`` files, or a table with a text column): ``txt``, plus ``json`` with
  the other fields of a JSONL/table record when there are any.

Keys are the record's index in the input (a zero-padded running number over the sorted files or the
table rows), so a key always leads back to its source. Records are written in an order shuffled by
``--seed`` (class folders would otherwise give one-class shards); ``--no-shuffle`` keeps input order.
``--val-fraction`` moves a seeded random part of the records (stratified by class when there are labels)
into ``val-*.tar`` shards. Images are fully decoded with PIL before they are written; a missing or
undecodable image is skipped and counted, or fatal with ``--strict``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmpretrain.data.decode import IMAGE_EXTENSIONS, SkipSample, decode_image
from mmpretrain.data.writer import INDEX_NAME, ShardWriter, read_index

KINDS = ("image-label", "image-text", "text")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".parquet", ".pq", ".jsonl", ".ndjson", ".json")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".ndjson")

# column names tried in this order (case-insensitive) when no --*-column flag names one
IMAGE_COLUMNS = ("image", "image_path", "imagepath", "filepath", "file_path", "img", "img_path", "image_file",
                 "path", "file", "filename", "file_name", "jpg", "png")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "txt", "description", "sentence", "alt", "alt_text", "prompt")
LABEL_COLUMNS = ("label", "class_name", "class", "category", "cls")
TEXT_COLUMNS = ("text", "content", "document", "body", "txt")
URL_COLUMNS = ("url", "image_url", "img_url", "link")

# PIL format -> member extension; other formats PIL opens are re-encoded as PNG so that readers find them
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                     "TIFF": "tiff", "PPM": "ppm", "JPEG2000": "jp2"}
FILE_IMAGE_SUFFIXES = {f".{ext}" for ext in IMAGE_EXTENSIONS} | {".jpe", ".jfif", ".pnm"}


class InputError(ValueError):
    """The input cannot be turned into shards as asked (names the file or column, and what to do)."""


# ---------------------------------------------------------------------------------------------- images
class ImageEncoder:
    """Checks image bytes by decoding them (as the training pipeline will) and picks the member to write.

    Returns ``(extension, bytes)``: the original bytes under the extension of their format, or, when the
    longer side exceeds ``max_size``, the image resized to ``max_size`` and re-encoded as JPEG.
    """

    def __init__(self, max_size: int | None = None, quality: int = 95) -> None:
        self.max_size = max_size
        self.quality = quality

    def __call__(self, data: bytes, name: str) -> tuple[str, bytes]:
        try:
            img = decode_image(data)
        except SkipSample as err:
            raise SkipSample("bad_image", f"{name}: {err.detail}") from None
        if self.max_size is not None and max(img.size) > self.max_size:
            scale = self.max_size / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            return "jpg", _jpeg(img.resize(size, Image.Resampling.LANCZOS), self.quality)
        with Image.open(io.BytesIO(data)) as header:
            ext = FORMAT_EXTENSIONS.get(header.format or "")
        if ext is None:  # a format PIL reads but shard readers may not look for (ICO, PSD ...)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "png", buf.getvalue()
        return ext, data

    def read(self, path: Path) -> tuple[str, bytes]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SkipSample("missing_image", f"{path}: no such file") from None
        except OSError as err:
            raise SkipSample("bad_image", f"{path}: cannot read: {err}") from None
        return self(data, str(path))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ plans
@dataclass
class Plan:
    """What to write: ``n`` records, ``load(i)`` -> the members of record i (raises SkipSample to skip it)."""

    kind: str
    n: int
    load: Callable[[int], dict[str, Any]]
    classes: list[str] | None = None
    labels: np.ndarray | None = None  # class index per record (-1: none), for a stratified split
    description: str = ""
    notes: list[str] = field(default_factory=list)


def plan_image_folder(root: Path, encoder: ImageEncoder) -> Plan:
    """``root/<class>/**/<image>``: classes are the subfolders (sorted by name); files sorted by path."""
    files: list[tuple[str, int]] = []  # (path relative to root, class index)
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, ignored, empty = [], 0, []
    for name in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                if Path(fn).suffix.lower() in FILE_IMAGE_SUFFIXES:
                    found.append(Path(dirpath, fn).relative_to(root).as_posix())
                else:
                    ignored += 1
        if not found:
            empty.append(name)
            continue
        files.extend((rel, len(classes)) for rel in sorted(found))
        classes.append(name)
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in FILE_IMAGE_SUFFIXES]
    if not files:
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise InputError(f"{root}: no class subfolders with images{hint}; an image folder is ROOT/<class>/<image>")
    notes = []
    if loose:
        notes.append(f"{len(loose)} images directly in {root} (outside any class folder) are not used, e.g. {loose[0]}")
    if empty:
        notes.append(f"subfolders without images are not classes: {', '.join(empty[:10])}")
    if ignored:
        notes.append(f"{ignored} files without an image extension are not used")

    def load(i: int) -> dict[str, Any]:
        rel, label = files[i]
        ext, data = encoder.read(root / rel)
        return {ext: data, "cls": label, "json": {"label": label, "class_name": classes[label], "source": rel}}

    labels = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    return Plan("image-label", len(files), load, classes, labels,
                f"image folder {root}: {len(files)} images in {len(classes)} classes", notes)


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]


def read_table(path: Path, header: bool = True) -> Table:
    """Rows of a CSV/TSV (stdlib csv), parquet (pyarrow) or JSONL/JSON-array file, as dicts."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        delimiter = "," if suffix == ".csv" else "\t"
        with open(path, newline="", encoding="utf-8-sig") as f:
            if header:
                reader = csv.DictReader(f, delimiter=delimiter)
                rows = [dict(r) for r in reader]
                columns = list(reader.fieldnames or [])
            else:
                raw = list(csv.reader(f, delimiter=delimiter))
                width = max((len(r) for r in raw), default=0)
                columns = [str(i) for i in range(width)]
                rows = [dict(zip(columns, r)) for r in raw]
        return Table(path, columns, rows)
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        return Table(path, list(table.column_names), table.to_pylist())
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise InputError(f"{path}:{lineno}: not a JSON line: {err}") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise InputError(f"{path}: record {bad + 1} is not a JSON object")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return Table(path, columns, rows)
    raise InputError(f"{path}: unknown table format {suffix!r}; give .csv, .tsv, .parquet or .jsonl")


def find_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], role: str, path: Path) -> str | None:
    if given is not None:
        if given not in columns:
            raise InputError(f"{path}: no column {given!r} (--{role}-column); columns are {', '.join(columns)}")
        return given
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def plan_tables(paths: list[Path], args: argparse.Namespace, encoder: ImageEncoder) -> Plan:
    """Tables of image path + caption (image-text), image path + label (image-label), or text (text)."""
    tables = [read_table(p, header=not args.no_header) for p in paths]
    first = tables[0]

    def col(given, candidates, role):
        return find_column(first.columns, given, candidates, role, first.path)

    image_col = col(args.image_column, IMAGE_COLUMNS, "image")
    caption_col = col(args.caption_column, CAPTION_COLUMNS, "caption")
    text_col = col(args.text_column, TEXT_COLUMNS, "text")
    label_col = col(args.label_column, LABEL_COLUMNS, "label")
    kind = args.kind
    if kind == "auto":
        if image_col is not None:
            kind = "image-text" if caption_col is not None else "image-label" if label_col is not None else ""
        else:
            kind = "text" if text_col is not None else ""
    urls = [c for c in first.columns if c.lower() in URL_COLUMNS]
    if kind in ("image-text", "image-label", "") and image_col is None and urls:
        raise InputError(f"{first.path}: column {urls[0]!r} holds URLs; make_shards reads local files only: "
                         "download the images first (img2dataset writes shards itself) or give --image-column")
    if kind in ("image-text", "image-label") and image_col is None:
        raise InputError(f"{first.path}: no image column among {', '.join(first.columns)}; give --image-column")
    if kind == "image-text" and caption_col is None:
        raise InputError(f"{first.path}: no caption column among {', '.join(first.columns)}; give --caption-column")
    if kind == "image-label" and label_col is None:
        raise InputError(f"{first.path}: no label column among {', '.join(first.columns)}; give --label-column")
    if kind == "text" and text_col is None:
        raise InputError(f"{first.path}: no text column among {', '.join(first.columns)}; give --text-column")
    if not kind:
        raise InputError(f"{first.path}: cannot tell what the columns {', '.join(first.columns)} hold; give --kind and "
                         "--image-column/--caption-column/--label-column/--text-column")
    if kind == "text":
        image_col = caption_col = label_col = None
    used = {"image": image_col, "caption": caption_col if kind == "image-text" else None,
            "label": label_col if kind != "text" else None, "text": text_col if kind == "text" else None}
    used = {role: c for role, c in used.items() if c is not None}
    for t in tables[1:]:
        missing = [c for c in used.values() if c not in t.columns]
        if missing:
            raise InputError(f"{t.path}: lacks column(s) {', '.join(missing)} that {first.path} has")

    rows: list[dict[str, Any]] = []
    roots: list[Path] = []
    for t in tables:
        rows.extend(t.rows)
        root = Path(args.image_root) if args.image_root else t.path.parent
        roots.extend([root] * len(t.rows))
    classes, labels = (None, None)
    if "label" in used:
        classes, labels = _table_labels([r.get(label_col) for r in rows], label_col)
    if image_col is not None:
        first_value = next((r.get(image_col) for r in rows if r.get(image_col)), None)
        if isinstance(first_value, str) and "://" in first_value:
            raise InputError(f"{first.path}: column {image_col!r} holds URLs ({first_value}); make_shards reads local "
                             "files only: download the images first (img2dataset writes shards itself)")
    skip_cols = set(used.values())

    def extra(row: dict[str, Any]) -> dict[str, Any]:
        return {k: _json_safe(v) for k, v in row.items() if k not in skip_cols and k is not None}

    def load(i: int) -> dict[str, Any]:
        row = rows[i]
        where = _source_name(tables, i)
        if kind == "text":
            text = _as_text(row.get(text_col))
            if text is None:
                raise SkipSample("missing_text", f"{where}: empty {text_col!r}")
            sample: dict[str, Any] = {"txt": text}
            meta = extra(row)
            if meta:
                sample["json"] = meta
            return sample
        value = row.get(image_col)
        source = value.get("path") if isinstance(value, dict) else value
        meta = {"source": source, **extra(row)} if isinstance(source, str) else extra(row)
        if kind == "image-text":
            caption = _as_text(row.get(caption_col))
            if caption is None:
                raise SkipSample("missing_caption", f"{where}: empty {caption_col!r}")
            if isinstance(row.get(caption_col), list):
                meta[caption_col] = _json_safe(row[caption_col])
        label = int(labels[i]) if labels is not None else -1
        if kind == "image-label" and label < 0:
            raise SkipSample("missing_label", f"{where}: empty {label_col!r}")
        ext, data = _read_table_image(value, roots[i], encoder, where)
        sample = {ext: data}
        if kind == "image-text":
            sample["txt"] = caption
        if label >= 0:
            sample["cls"] = label
            meta.update(label=label, class_name=classes[label])
        sample["json"] = meta
        return sample

    names = ", ".join(f"{role}={c!r}" for role, c in used.items())
    what = f"{len(tables)} tables" if len(tables) > 1 else str(first.path)
    desc = f"{what}: {len(rows)} rows, {kind} from columns {names}"
    if classes:
        desc += f", {len(classes)} classes"
    return Plan(kind, len(rows), load, classes, labels, desc)


def _source_name(tables: list[Table], i: int) -> str:
    for t in tables:
        if i < len(t.rows):
            return f"{t.path} row {i + 1}"
        i -= len(t.rows)
    return f"row {i + 1}"


def _read_table_image(value: Any, root: Path, encoder: ImageEncoder, where: str) -> tuple[str, bytes]:
    if isinstance(value, dict):  # Hugging Face datasets' parquet images: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return encoder(bytes(value), where)
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("missing_image", f"{where}: no image path")
    path = Path(value.strip()).expanduser()
    return encoder.read(path if path.is_absolute() else root / path)


def _table_labels(values: list[Any], column: str) -> tuple[list[str], np.ndarray]:
    """Class names and a label index per row (-1 where empty): integers as they are, names sorted."""
    present = [v for v in values if _present(v)]
    if not present:
        raise InputError(f"label column {column!r} is empty in every row")
    as_int = [_int_or_none(v) for v in present]
    if all(x is not None and x >= 0 for x in as_int):
        classes = [str(i) for i in range(max(as_int) + 1)]
        lookup: Callable[[Any], int] = lambda v: _int_or_none(v)  # noqa: E731
    else:
        classes = sorted({str(v).strip() for v in present})
        index = {name: i for i, name in enumerate(classes)}
        lookup = lambda v: index[str(v).strip()]  # noqa: E731
    labels = np.array([lookup(v) if _present(v) else -1 for v in values], dtype=np.int64)
    return classes, labels


def _present(v: Any) -> bool:
    return v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _as_text(value: Any) -> str | None:
    """A caption/document as stripped text; a list of strings gives its first non-empty one; None if empty."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return None  # binary columns stay out of the JSON member
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)  # dates, decimals ...


class TextRecords:
    """Documents in text files, as (file, byte offset, length) so that large corpora need not fit in memory.

    A ``.txt`` file is one document (or one per non-blank line with ``split_lines``); a ``.jsonl`` file
    holds one JSON object per line with the text in ``text_field``.
    """

    def __init__(self, paths: list[Path], split_lines: bool, text_field: str | None) -> None:
        self.paths = paths
        self.text_field = text_field
        self.fields: list[str] = []  # the text field of each JSON file ("" for plain text)
        self.file, self.offset, self.length = array("l"), array("q"), array("q")
        for fi, path in enumerate(paths):
            is_json = path.suffix.lower() in (".jsonl", ".ndjson")
            self.fields.append(self._text_field(path) if is_json else "")
            if not is_json and not split_lines:
                self._add(fi, 0, -1)
                continue
            with open(path, "rb") as f:
                pos = 0
                for line in f:
                    if line.strip():
                        self._add(fi, pos, len(line))
                    pos += len(line)

    def _add(self, fi: int, offset: int, length: int) -> None:
        self.file.append(fi)
        self.offset.append(offset)
        self.length.append(length)

    def _text_field(self, path: Path) -> str:
        keys = first_json_keys(path)
        if keys is None:  # an empty file
            return self.text_field or "text"
        name = find_column(keys, self.text_field, TEXT_COLUMNS, "text", path)
        if name is None:
            raise InputError(f"{path}: no text field among {', '.join(keys)}; give --text-column")
        return name

    def __len__(self) -> int:
        return len(self.file)

    def load(self, i: int) -> dict[str, Any]:
        path, offset, length = self.paths[self.file[i]], self.offset[i], self.length[i]
        where = f"{path}" if length < 0 else f"{path} at byte {offset}"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read() if length < 0 else f.read(length)
        except OSError as err:
            raise SkipSample("bad_text", f"{where}: cannot read: {err}") from None
        try:
            text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
        except UnicodeDecodeError as err:
            raise SkipSample("bad_text", f"{where}: not UTF-8: {err}") from None
        meta = None
        name = self.fields[self.file[i]]
        if name:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise SkipSample("bad_text", f"{where}: not a JSON line: {err}") from None
            if not isinstance(record, dict):
                raise SkipSample("bad_text", f"{where}: not a JSON object")
            text = _as_text(record.get(name)) or ""
            meta = {k: _json_safe(v) for k, v in record.items() if k != name}
        text = text.strip()
        if not text:
            raise SkipSample("missing_text", f"{where}: empty document")
        return {"txt": text, "json": meta} if meta else {"txt": text}


def first_json_keys(path: Path) -> list[str] | None:
    """The field names of the first record of a JSONL file (None when it holds none)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return None
    try:
        record = json.loads(first)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: the first line is not JSON: {err}") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: the first line is not a JSON object")
    return list(record)


def plan_text_files(paths: list[Path], args: argparse.Namespace) -> Plan:
    records = TextRecords(paths, args.split_lines, args.text_column)
    what = str(paths[0]) if len(paths) == 1 else f"{len(paths)} text files"
    return Plan("text", len(records), records.load, description=f"{what}: {len(records)} documents")


def make_plan(args: argparse.Namespace, encoder: ImageEncoder) -> Plan:
    inputs = [Path(p).expanduser() for p in args.input]
    for p in inputs:
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
    dirs = [p for p in inputs if p.is_dir()]
    if dirs:
        if args.kind == "text":
            files = sorted({f for d in dirs for f in d.rglob("*") if f.is_file() and f.suffix.lower() in
                            TEXT_FILE_SUFFIXES} | {p for p in inputs if p.is_file()})
            if not files:
                raise InputError(f"{dirs[0]}: holds no .txt or .jsonl files")
            return plan_text_files(files, args)
        if len(inputs) > 1:
            raise InputError("give one image folder (ROOT/<class>/<image>) per run; a folder cannot be mixed with files")
        if args.kind not in ("auto", "image-label"):
            raise InputError(f"{inputs[0]} is a folder: it makes image-label shards (or --kind text for text files)")
        return plan_image_folder(inputs[0], encoder)
    suffixes = {p.suffix.lower() for p in inputs}
    if args.kind == "text" and suffixes <= {".txt", ".jsonl", ".ndjson"}:
        return plan_text_files(inputs, args)
    if suffixes == {".txt"}:
        if args.kind not in ("auto", "text"):
            raise InputError(f"{inputs[0]}: .txt files are text documents (--kind text)")
        return plan_text_files(inputs, args)
    unknown = [p for p in inputs if p.suffix.lower() not in TABLE_SUFFIXES]
    if unknown:
        raise InputError(f"{unknown[0]}: not a folder, table (.csv .tsv .parquet .jsonl) or text file (.txt)")
    if args.kind in ("auto", "text") and suffixes <= {".jsonl", ".ndjson"}:
        # JSONL of documents streams from disk; JSONL with an image column is a table
        keys = first_json_keys(inputs[0]) or []
        if args.kind == "text" or (find_column(keys, args.image_column, IMAGE_COLUMNS, "image", inputs[0]) is None
                                   and find_column(keys, args.text_column, TEXT_COLUMNS, "text", inputs[0])):
            return plan_text_files(inputs, args)
    return plan_tables(inputs, args, encoder)


# ------------------------------------------------------------------------------------------------ order
def record_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).permutation(n) if shuffle else np.arange(n)


def choose_val(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """A boolean mask of the records that go to validation: ``round(n * fraction)`` of them, chosen by
    ``seed``; with labels, each class gives its share (largest remainders get the rounding)."""
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0 or n == 0:
        return mask
    rng = np.random.default_rng([seed, 1])
    total = round(n * fraction)
    if labels is None:
        mask[rng.choice(n, size=total, replace=False)] = True
        return mask
    groups, inverse = np.unique(labels, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    quota = np.array([len(m) for m in members]) * fraction
    take = np.floor(quota).astype(int)
    extra = total - int(take.sum())
    if extra > 0:
        take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    for m, k in zip(members, take):
        mask[rng.choice(m, size=int(k), replace=False)] = True
    return mask


# ---------------------------------------------------------------------------------------------- writing
def ordered_results(fn: Callable[[int], Any], items: Iterable[int], workers: int) -> Iterator[tuple[int, Any]]:
    """``(item, fn(item) or the SkipSample it raised)`` in input order, computed by ``workers`` threads."""

    def call(i: int) -> Any:
        try:
            return fn(i)
        except SkipSample as err:
            return err

    if workers <= 1:
        for i in items:
            yield i, call(i)
        return
    window: deque[tuple[int, Future]] = deque()
    it = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="make_shards") as pool:
        for i in it:
            window.append((i, pool.submit(call, i)))
            if len(window) >= 4 * workers:
                j, fut = window.popleft()
                yield j, fut.result()
        while window:
            j, fut = window.popleft()
            yield j, fut.result()


@dataclass
class Result:
    written: dict[str, int] = field(default_factory=dict)  # split -> samples
    shards: dict[str, int] = field(default_factory=dict)  # split -> shards
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few details


def existing_shards(output: Path, prefixes: Sequence[str]) -> list[Path]:
    return sorted(p for prefix in prefixes for p in output.glob(f"{prefix}-*.tar"))


def remove_shards(output: Path, paths: list[Path]) -> None:
    """Delete old shards and drop them from index.json (so that a smaller rerun leaves no stale shards)."""
    for p in paths:
        p.unlink()
    index = read_index(output)
    if index is None:
        return
    names = {p.name for p in paths}
    index["shards"] = {k: v for k, v in index["shards"].items() if k not in names}
    tmp = output / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, output / INDEX_NAME)


def write_shards(plan: Plan, args: argparse.Namespace, log: Callable[[str], None]) -> Result:
    output = Path(args.output)
    splits = {"train": args.prefix}
    val_mask = choose_val(plan.n, args.val_fraction, args.seed, plan.labels)
    if args.val_fraction > 0:
        splits["val"] = args.val_prefix
    order = record_order(plan.n, not args.no_shuffle, args.seed)
    width = max(6, len(str(max(plan.n - 1, 0))))
    metadata = {"kind": plan.kind, "classes": plan.classes}
    result = Result(written={s: 0 for s in splits})
    start = time.monotonic()
    done = 0
    with ExitStack() as stack:  # on an error: finished shards stay (and are indexed), the open one is dropped
        writers = {s: stack.enter_context(ShardWriter(output, prefix=p, shard_size=args.shard_size, metadata=metadata))
                   for s, p in splits.items()}
        for i, sample in ordered_results(plan.load, (int(i) for i in order), args.workers):
            done += 1
            if isinstance(sample, SkipSample):
                if args.strict:
                    raise InputError(f"{sample} (record {i}; --strict stops at the first bad record)")
                result.skipped[sample.reason] += 1
                result.examples.setdefault(sample.reason, [])
                if len(result.examples[sample.reason]) < 5:
                    result.examples[sample.reason].append(sample.detail)
            else:
                split = "val" if val_mask[i] else "train"
                writers[split].write({"__key__": f"{i:0{width}d}", **sample})
                result.written[split] += 1
            if args.log_every and done % args.log_every == 0:
                rate = done / max(time.monotonic() - start, 1e-9)
                log(f"{done}/{plan.n} records, {sum(result.written.values())} written, "
                    f"{sum(result.skipped.values())} skipped ({rate:.0f}/s)")
    result.shards = {split: len(w.counts) for split, w in writers.items()}
    return result


# -------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.make_shards",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when shards were written (skipped records are reported on stderr), "
               "1 on an input error, with --strict on the first bad record, or when nothing could be written.")
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", "-i", nargs="+", required=True, metavar="SRC",
                     help="an image folder ROOT/<class>/<image>; tables (.csv .tsv .parquet .jsonl) of image path + "
                          "caption/label or of text; text documents (.jsonl with a text field, .txt files, or a "
                          "folder of them with --kind text). Several tables or text files are concatenated.")
    io_.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for the shards and index.json")
    io_.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                     help="what to make (default: from the input: a folder gives image-label; a table with image "
                          "and caption columns image-text, with image and label columns image-label, with only a "
                          "text column text; .txt files text)")
    io_.add_argument("--image-root", metavar="ROOT",
                     help="directory that relative image paths in a table start from (default: the table's directory)")
    io_.add_argument("--overwrite", action="store_true",
                     help="replace shards of the same prefixes already in DIR (default: refuse to mix with them)")
    cols = p.add_argument_group("table columns (default: detected by name, case-insensitive)")
    cols.add_argument("--image-column", metavar="COL", help=f"image path (tried: {', '.join(IMAGE_COLUMNS[:8])} ...)")
    cols.add_argument("--caption-column", metavar="COL", help=f"caption (tried: {', '.join(CAPTION_COLUMNS[:6])} ...)")
    cols.add_argument("--label-column", metavar="COL",
                      help=f"class label, integers or class names (tried: {', '.join(LABEL_COLUMNS)})")
    cols.add_argument("--text-column", metavar="COL", help=f"document text (tried: {', '.join(TEXT_COLUMNS)})")
    cols.add_argument("--no-header", action="store_true",
                      help="CSV/TSV without a header row; columns are then named 0, 1, 2 ...")
    cols.add_argument("--split-lines", action="store_true",
                      help="each non-blank line of a .txt file is one document (default: each file is one)")
    shards = p.add_argument_group("shards")
    shards.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    shards.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default train)")
    shards.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of the records written as validation shards (default 0)")
    shards.add_argument("--val-prefix", default="val", help="prefix of the validation shards (default val)")
    shards.add_argument("--seed", type=int, default=0, help="seeds the validation split and the write order (default 0)")
    shards.add_argument("--no-shuffle", action="store_true",
                        help="write records in input order (default: a seeded shuffle, so that shards mix classes)")
    img = p.add_argument_group("images")
    img.add_argument("--max-image-size", type=int, metavar="N",
                     help="resize images whose longer side exceeds N to N and re-encode them as JPEG")
    img.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="quality of re-encoded JPEGs (default 95)")
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                     help="threads reading and checking images (default: min(8, CPUs)); output order does not depend on it")
    run.add_argument("--strict", action="store_true",
                     help="stop at the first missing or unreadable record, naming it (default: skip and count)")
    run.add_argument("--log-every", type=int, default=1000, metavar="N", help="progress line every N records (0: none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val-fraction must be in [0, 1)")
    if args.max_image_size is not None and args.max_image_size < 1:
        parser.error("--max-image-size must be positive")
    if args.prefix == args.val_prefix:
        parser.error("--prefix and --val-prefix must differ")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    def log(msg: str) -> None:
        print(f"make_shards: {msg}", file=sys.stderr, flush=True)

    output = Path(args.output)
    try:
        prefixes = [args.prefix] + ([args.val_prefix] if args.val_fraction > 0 else [])
        old = existing_shards(output, prefixes) if output.is_dir() else []
        if old and not args.overwrite:
            raise InputError(f"{output} already holds {len(old)} shards named {'/'.join(prefixes)}-*.tar "
                             f"(e.g. {old[0].name}); choose another --output, another --prefix, or --overwrite")
        encoder = ImageEncoder(args.max_image_size, args.jpeg_quality)
        plan = make_plan(args, encoder)
        log(plan.description)
        for note in plan.notes:
            log(f"note: {note}")
        if plan.n == 0:
            raise InputError("the input holds no records")
        if old:
            remove_shards(output, old)
            log(f"removed {len(old)} old shards from {output}")
        result = write_shards(plan, args, log)
    except InputError as err:
        log(f"error: {err}")
        return 1
    skipped = sum(result.skipped.values())
    if skipped:
        log(f"skipped {skipped} of {plan.n} records: " + ", ".join(f"{r} {c}" for r, c in result.skipped.most_common()))
        for reason, examples in result.examples.items():
            for ex in examples:
                log(f"  {reason}: {ex}")
            if result.skipped[reason] > len(examples):
                log(f"  {reason}: ... and {result.skipped[reason] - len(examples)} more")
    total = sum(result.written.values())
    parts = ", ".join(f"{s}: {_plural(result.shards[s], 'shard')}, {_plural(result.written[s], 'sample')}"
                      for s in result.written)
    classes = f", {len(plan.classes)} classes" if plan.classes else ""
    print(f"wrote {total} {plan.kind} samples to {output} ({parts}{classes}); skipped {skipped}")
    if total == 0:
        log("error: no record could be written")
        return 1
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


if __name__ == "__main__":
    sys.exit(main())
