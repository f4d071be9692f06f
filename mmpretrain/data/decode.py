"""Reading the fields of one raw webdataset sample: images of any mode as RGB, captions, labels, text.

Field specifications name a member of the sample by its extension (``"txt"``, ``"cls"``, ``"jpg"``) or a
field inside its JSON member (``"json:caption"``, ``"json:meta.label"``). ``"auto"`` for images takes the
first member whose extension PIL reads, so img2dataset-style shards (``jpg``/``txt``/``json``) and ours
read without conversion.
"""

from __future__ import annotations

import io
import json
import random
import re
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jp2", "jpx")


class SkipSample(Exception):
    """A sample that cannot be used: its key and why. Counted and skipped (or raised in strict mode)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def image_member(sample: dict, image_key: str = "auto") -> bytes:
    """The bytes of the sample's image member (``image_key`` an extension, or ``"auto"``)."""
    if image_key != "auto":
        data = sample.get(image_key)
        if data is None:
            raise SkipSample("missing_image", f"no '{image_key}' member (has {_members(sample)})")
        return data
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    for key, value in sample.items():  # e.g. "0.jpg", "image.png"
        if not key.startswith("__") and key.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return value
    raise SkipSample("missing_image", f"no image member (has {_members(sample)})")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, whatever the mode.

    Grayscale, palette and CMYK convert as PIL does; transparency is composited onto white (dropping
    the alpha channel, as a bare ``convert("RGB")`` would, shows whatever colour hides under it);
    16/32-bit integer and float images are scaled to 8 bits.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(err))
        raise SkipSample("bad_image", f"{type(err).__name__}: {message}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _members(sample: dict) -> str:
    return ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"


def read_field(sample: dict, spec: str, what: str = "field") -> Any:
    """Read a member (``"txt"``) or a JSON field (``"json:caption"``, dotted for nesting) of a sample.

    Text members are decoded as UTF-8; raises SkipSample("missing_<what>") when absent or empty.
    """
    if spec.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            raise SkipSample(f"missing_{what}", f"no 'json' member for {spec!r} (has {_members(sample)})")
        try:
            value: Any = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SkipSample(f"bad_{what}", f"json member does not parse: {err}") from None
        for part in spec[len("json:") :].split("."):
            if not isinstance(value, dict) or part not in value:
                raise SkipSample(f"missing_{what}", f"json has no field {spec[5:]!r}")
            value = value[part]
    else:
        value = sample.get(spec)
        if value is None:
            raise SkipSample(f"missing_{what}", f"no '{spec}' member (has {_members(sample)})")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SkipSample(f"bad_{what}", f"'{spec}' is not UTF-8: {err}") from None
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        raise SkipSample(f"missing_{what}", f"{spec!r} is empty")
    return value


def read_text(sample: dict, spec: str, rng: random.Random | None = None, what: str = "text") -> str:
    """A caption or document; when the field holds a list of strings one is chosen (by ``rng``, else the first)."""
    value = read_field(sample, spec, what)
    if isinstance(value, list):
        value = rng.choice(value) if rng is not None else value[0]
    if not isinstance(value, str):
        value = str(value)
    value = value.strip()
    if not value:
        raise SkipSample(f"missing_{what}", f"{spec!r} is blank")
    return value


def read_label(sample: dict, spec: str, class_to_index: dict[str, int] | None = None) -> int:
    """An integer class label from ``cls`` (text integer) or a JSON field (int, or a class name)."""
    value = read_field(sample, spec, "label")
    if isinstance(value, str):
        value = value.strip()
        # a member such as ``cls`` holds an index: read it as one first, so that numeric class names
        # ("0", "1", "10" ...) never shadow indices; a JSON string is a class name first
        as_name = spec.startswith("json:")
        if as_name and class_to_index is not None and value in class_to_index:
            return class_to_index[value]
        try:
            return int(value)
        except ValueError:
            if class_to_index is not None and value in class_to_index:
                return class_to_index[value]
            raise SkipSample("bad_label", f"{spec!r} = {value!r} is neither an integer nor a known class name") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SkipSample("bad_label", f"{spec!r} = {value!r} is not an integer label")
    return int(value)
