"""Shared fixtures: small shard sets made on the fly (tests never download anything)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from mmpretrain.data.writer import ShardWriter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the demo set is generated into a cache of the test session's own (a few seconds), never the user's
os.environ.setdefault("MMPRETRAIN_CACHE", tempfile.mkdtemp(prefix="mmpretrain-test-cache-"))


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_image_shards(
    directory: Path, counts: list[int], prefix: str = "train", num_classes: int = 3, size: int = 16
) -> list[str]:
    """Shards with ``counts[i]`` samples each; sample n has label n % num_classes and caption 'sample n'."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    n = 0
    for i, count in enumerate(counts):
        # one writer per shard so that shards can hold different counts
        with ShardWriter(directory, prefix=f"{prefix}{i}", shard_size=max(count, 1),
                         metadata={"kind": "image-text-label", "classes": [f"c{k}" for k in range(num_classes)]}) as w:
            for _ in range(count):
                label = n % num_classes
                w.write({"__key__": f"{n:06d}", "jpg": jpeg_bytes((40 * label, 100, 200), size),
                         "cls": label, "txt": f"sample {n}", "json": {"label": label, "n": n}})
                n += 1
        if count == 0:  # an empty tar, as some tools leave behind
            import tarfile

            name = directory / f"{prefix}{i}-000000.tar"
            tarfile.open(name, "w").close()
        paths.append(str(directory / f"{prefix}{i}-000000.tar"))
    return paths


@pytest.fixture
def image_shards(tmp_path: Path):
    """A factory: image_shards([5, 3, 4]) -> list of shard paths in a fresh directory."""
    counter = iter(range(1000))

    def make(counts: list[int], **kwargs) -> list[str]:
        return write_image_shards(tmp_path / f"set{next(counter)}", counts, **kwargs)

    return make
