"""Finding shards and reading their raw samples.

Shard specifications accepted everywhere in mmpretrain:

- a brace pattern: ``"data/train-{000000..000099}.tar"`` (local paths, ``file:`` or ``pipe:`` URLs)
- a glob over local files: ``"data/train-*.tar"``
- a list of the above; each element is one *source* (for weighted sampling in resampled mode)
- ``"demo:images/train"``: the built-in demo set (generated into the cache on first use)

Sample counts come from ``index.json`` beside the shards (written by our tools), from img2dataset's
``<shard>_stats.json``, or, for local shards without either, from reading the tar headers.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mmpretrain.data.writer import read_index

ShardSpec = str | Sequence[str]


class ShardError(ValueError):
    """A shard specification that names nothing, or a shard that cannot be read."""


def is_remote(url: str) -> bool:
    """True for URLs gopen handles as streams (pipe:, http:, s3: ...), False for local paths."""
    if url.startswith("file:"):
        return False
    head = url.split(":", 1)[0]
    return ":" in url and len(head) > 1 and "/" not in head


def _local_path(url: str) -> str:
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix) :]
    return url


@dataclass
class ShardSource:
    """One source of shards: the pattern it came from and the URLs it expands to."""

    pattern: str
    urls: list[str]
    weight: float = 1.0
    counts: list[int | None] = field(default_factory=list)

    @property
    def num_samples(self) -> int | None:
        if not self.counts or any(c is None for c in self.counts):
            return None
        return sum(self.counts)  # type: ignore[arg-type]


def expand_pattern(pattern: str) -> list[str]:
    """Expand one pattern into shard URLs; raises ShardError naming the pattern when it matches nothing."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ShardError(f"empty shard pattern {pattern!r}: give a path, brace pattern or URL of .tar shards")
    pattern = pattern.strip()
    if pattern.startswith("demo:"):
        from mmpretrain.data.demo import demo_shards

        return list(demo_shards(pattern[len("demo:") :]))
    urls: list[str] = []
    for url in braceexpand.braceexpand(pattern):
        if is_remote(url):
            urls.append(url)
            continue
        path = _local_path(url)
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(path)))
            if not matches:
                raise ShardError(f"shard pattern {pattern!r}: glob {path!r} matches no file")
            urls.extend(matches)
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.tar")))
            if not found:
                raise ShardError(f"shard pattern {pattern!r}: directory {path!r} holds no .tar shards")
            urls.extend(found)
        elif not os.path.isfile(os.path.expanduser(path)):
            raise ShardError(
                f"shard pattern {pattern!r}: {path!r} does not exist (check the path and the brace range)"
            )
        else:
            urls.append(os.path.expanduser(path))
    if not urls:
        raise ShardError(f"shard pattern {pattern!r} matches no shard")
    return urls


def resolve_sources(
    spec: ShardSpec | None, weights: Sequence[float] | None = None, *, what: str = "shards", count: bool = True
) -> list[ShardSource]:
    """Turn a shard specification into sources with URLs (and sample counts when ``count``).

    ``what`` names the config field in error messages (``"data.train_shards"``).
    """
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        raise ShardError(f"{what} is empty: give a shard pattern such as 'shards/train-{{000000..000009}}.tar'")
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if weights is not None:
        if len(weights) != len(patterns):
            raise ShardError(
                f"{what}: {len(weights)} weights for {len(patterns)} sources; give one weight per source pattern"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ShardError(f"{what}: weights must be non-negative with a positive sum, got {list(weights)}")
    sources = []
    for i, pattern in enumerate(patterns):
        try:
            urls = expand_pattern(pattern)
        except ShardError as err:
            raise ShardError(f"{what}: {err}") from None
        src = ShardSource(pattern, urls, 1.0 if weights is None else float(weights[i]))
        if count:
            src.counts = shard_sample_counts(urls)
        sources.append(src)
    return sources


def shard_sample_counts(urls: Sequence[str], scan_local: bool = True) -> list[int | None]:
    """Samples per shard: from index.json, img2dataset stats files, or tar headers (local); None if unknown."""
    indexes: dict[str, dict | None] = {}
    counts: list[int | None] = []
    for url in urls:
        if is_remote(url):
            counts.append(None)
            continue
        path = Path(_local_path(url))
        directory = str(path.parent)
        if directory not in indexes:
            try:
                indexes[directory] = read_index(directory)
            except (ValueError, json.JSONDecodeError) as err:
                raise ShardError(f"{directory}/index.json is unreadable: {err}") from None
        index = indexes[directory]
        entry = index["shards"].get(path.name) if index else None
        if entry is not None:
            counts.append(int(entry["samples"]))
            continue
        stats = path.with_name(path.stem + "_stats.json")  # img2dataset
        if stats.is_file():
            with open(stats) as f:
                n = json.load(f).get("successes")
            if isinstance(n, int):
                counts.append(n)
                continue
        counts.append(count_tar_samples(str(path)) if scan_local else None)
    return counts


def count_tar_samples(path: str) -> int | None:
    """Count distinct sample keys in a local tar by reading its headers; None if unreadable."""
    keys = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if info.isreg():
                    name = os.path.basename(info.name)
                    if name.startswith("__"):
                        continue
                    keys.add(os.path.join(os.path.dirname(info.name), name.split(".", 1)[0]))
    except (tarfile.TarError, OSError, EOFError):
        return None
    return len(keys)


def read_index_metadata(urls: Sequence[str]) -> dict:
    """Metadata (kind, classes, templates ...) merged from the index.json files of the shards' directories."""
    meta: dict = {}
    seen = set()
    for url in urls:
        if is_remote(url):
            continue
        directory = str(Path(_local_path(url)).parent)
        if directory in seen:
            continue
        seen.add(directory)
        index = read_index(directory)
        if index:
            for k, v in index.items():
                if k not in ("shards", "version"):
                    meta.setdefault(k, v)
    return meta


class ShardReadError(RuntimeError):
    """Raised in strict mode when a shard or a sample cannot be read; names the shard and the key."""


def iter_shard_samples(
    url: str,
    on_shard_error: Callable[[str, Exception], None] | None = None,
) -> Iterator[dict]:
    """Yield the raw samples of one shard as dicts ``{"__key__", "__url__", ext: bytes ...}``.

    A shard that cannot be opened or is truncated ends early: samples read before the fault are
    yielded, then ``on_shard_error(url, exc)`` is called (default: raise ShardReadError naming it).
    """
    stream = None
    try:
        stream = wds.gopen(url, "rb")
        files = tar_file_iterator(stream)
        files = ({**f, "__url__": url} for f in files)
        yield from group_by_keys(files)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        if on_shard_error is None:
            raise ShardReadError(f"shard {url}: {type(err).__name__}: {err}") from err
        on_shard_error(url, err)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as err:  # a pipe: command that failed reports on close
                if on_shard_error is None:
                    raise ShardReadError(f"shard {url}: {err}") from err
                on_shard_error(url, err)
