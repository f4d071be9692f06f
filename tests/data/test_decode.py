"""Images of any mode decode to RGB; fields read from members or JSON."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mmpretrain.data.decode import SkipSample, decode_image, image_member, read_label, read_text


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"),
     ("I;16", "PNG"), ("1", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF")],
)
def test_any_mode_becomes_rgb(mode, fmt):
    img = Image.new("RGB", (9, 7), (30, 120, 220)).convert(mode)
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (9, 7)


def test_transparency_composites_onto_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[3, 3]) == (255, 255, 255)


def test_sixteen_bit_grayscale_scales_to_eight_bits():
    arr16 = np.full((3, 3), 65535, dtype=np.uint16)
    arr16[0, 0] = 0
    out = np.asarray(decode_image(encode(Image.fromarray(arr16), "PNG")))
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0


def test_broken_and_missing_images_raise_skip():
    good = encode(Image.new("RGB", (8, 8)), "JPEG")
    with pytest.raises(SkipSample) as err:
        decode_image(good[:20])
    assert err.value.reason == "bad_image"
    with pytest.raises(SkipSample) as err:
        image_member({"__key__": "k", "txt": b"x"})
    assert err.value.reason == "missing_image" and "txt" in str(err.value)
    assert image_member({"png": b"p", "jpg": b"j"}) == b"j"  # first known extension wins
    assert image_member({"image.webp": b"w"}) == b"w"


def test_fields_from_members_and_json():
    sample = {"txt": b" a cat \n", "cls": b"3", "json": b'{"caption": ["one", "two"], "meta": {"label": "dog"}}'}
    assert read_text(sample, "txt") == "a cat"
    assert read_text(sample, "json:caption") == "one"
    assert read_label(sample, "cls") == 3
    assert read_label(sample, "json:meta.label", {"cat": 0, "dog": 1}) == 1
    with pytest.raises(SkipSample) as err:
        read_text(sample, "json:title")
    assert err.value.reason == "missing_text"
    with pytest.raises(SkipSample) as err:
        read_label({"cls": b"seven"}, "cls")
    assert err.value.reason == "bad_label"


def test_numeric_class_names_never_shadow_indices():
    names = sorted(str(i) for i in range(12))  # "0", "1", "10", "11", "2" ...
    index = {n: i for i, n in enumerate(names)}
    assert read_label({"cls": b"2"}, "cls", index) == 2  # an index, not the class named "2"
    assert read_label({"json": b'{"label": "10"}'}, "json:label", index) == names.index("10")
    assert read_label({"cls": b"dog"}, "cls", {"dog": 5}) == 5


def test_undecodable_image_message_is_readable():
    with pytest.raises(SkipSample) as err:
        decode_image(b"definitely not an image")
    assert "BytesIO" not in str(err.value)
