"""Writing webdataset shards and the small JSON index that the data modules read.

A shard is a plain tar file of samples; the files of one sample share a key (``000042.jpg``,
``000042.txt``). Beside the shards, ``index.json`` records how many samples each shard holds, so
that data modules know epoch lengths without reading the data, plus what the set is (its kind,
class names). Several writers may add to one directory's index (train and val splits side by side).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def read_index(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The index of a shard directory, or None when it has none."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        index = json.load(f)
    if not isinstance(index, dict) or not isinstance(index.get("shards"), dict):
        raise ValueError(f"{path}: not a shard index (expected an object with a 'shards' mapping)")
    return index


def update_index(directory: str | os.PathLike, shards: Mapping[str, int], **metadata: Any) -> Path:
    """Add shard sample counts (file name -> samples) and metadata to ``directory/index.json``.

    Existing entries for other shards are kept; metadata keys given here replace old values.
    The file is replaced atomically.
    """
    directory = Path(directory)
    index = read_index(directory) or {"version": INDEX_VERSION, "shards": {}}
    for name, count in shards.items():
        index["shards"][name] = {"samples": int(count)}
    index.update({k: v for k, v in metadata.items() if v is not None})
    _atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return directory / INDEX_NAME


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; an index is for every reader of the shards
    os.replace(tmp, path)


class ShardWriter:
    """Writes samples into numbered tar shards ``{prefix}-{000000}.tar`` of ``shard_size`` samples.

    Each sample is a mapping from extension (``"jpg"``, ``"txt"``, ``"cls"``, ``"json"`` ...) to bytes
    or str, plus ``"__key__"``. A shard is written under a temporary name and renamed when complete,
    so a crash never leaves a half-written shard under a real name. On close the sample counts and
    ``metadata`` are merged into the directory's ``index.json``.

    >>> with ShardWriter("out", prefix="train", shard_size=1000, metadata={"kind": "image-text"}) as w:
    ...     w.write({"__key__": "000000", "jpg": jpeg_bytes, "txt": "a red circle"})
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "train",
        shard_size: int = 1000,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        if "/" in prefix or not prefix:
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_size = shard_size
        self.metadata = dict(metadata or {})
        self.counts: dict[str, int] = {}
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._name: str | None = None
        self._in_shard = 0
        self._keys: set[str] = set()

    @property
    def paths(self) -> list[Path]:
        return [self.output_dir / name for name in self.counts]

    @property
    def num_samples(self) -> int:
        return sum(self.counts.values()) + self._in_shard

    def write(self, sample: Mapping[str, Any]) -> None:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key:
            raise ValueError("every sample needs a non-empty string '__key__'")
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain '.': readers split file names at the first dot")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard set {self.prefix!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open_next()
        self._tar.write(dict(sample))
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._finish_shard()

    def _open_next(self) -> None:
        self._name = f"{self.prefix}-{len(self.counts):06d}.tar"
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=f".{self._name}.", suffix=".tmp")
        os.close(fd)
        self._tmp_path = Path(tmp)
        # fixed mtime and owner: the same samples always give byte-identical shards (an int mtime:
        # a float one makes tarfile add a PAX header to every member)
        self._tar = wds.TarWriter(str(self._tmp_path), encoder=_encode, mtime=0, user="mmpretrain", group="mmpretrain")
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None and self._name is not None
        self._tar.close()
        os.chmod(self._tmp_path, 0o644)
        os.replace(self._tmp_path, self.output_dir / self._name)
        self.counts[self._name] = self._in_shard
        self._tar, self._tmp_path, self._in_shard = None, None, 0

    def close(self) -> list[Path]:
        if self._tar is not None:
            self._finish_shard()
        update_index(self.output_dir, self.counts, **self.metadata)
        return self.paths

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar, self._tmp_path, self._in_shard = None, None, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
            if self.counts:
                update_index(self.output_dir, self.counts, **self.metadata)


def _encode(sample: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
        elif isinstance(v, str):
            out[k] = v.encode("utf-8")
        elif isinstance(v, int) and not isinstance(v, bool):
            out[k] = str(v).encode("utf-8")
        elif isinstance(v, (dict, list)):
            out[k] = json.dumps(v, ensure_ascii=False).encode("utf-8")
        elif isinstance(v, (bytes, bytearray, memoryview)):
            out[k] = bytes(v)
        else:
            raise TypeError(f"sample {sample.get('__key__')!r}: field {k!r} has type {type(v).__name__}; give bytes, str, int or JSON")
    return out
