"""The built-in demo set: coloured shapes with captions and labels, a small text corpus, and a tokenizer.

Everything is generated, deterministically from a seed, so that every recipe's demo runs with no data to
prepare and nothing to download, and a tiny model learns something measurable in minutes on a CPU:

- ``images/train`` (8 shards x 2000) and ``images/val`` (2 x 250): 64x64 JPEGs of one of 8 shapes
  (the class) in one of 8 colours, 3 sizes, 9 positions, tilted by up to 15 degrees, on a solid, gradient
  or noisy background, sometimes with a small distractor. Each sample has ``jpg``, ``txt`` (a caption
  that always names the colour and the shape, and sometimes the size, position and background, in varied
  wording), ``cls`` and ``json`` (the attributes).
- ``text/train`` (4 x 500 documents) and ``text/val`` (1 x 250): documents with structure a small language
  model can learn: scene descriptions with counts, arithmetic, counting sequences, short stories with
  questions about them, sentences of a small grammar and a fixed set of facts.
- ``tokenizer/``: a byte-level BPE (vocabulary up to 4096) trained on the training captions and documents.

``ensure_demo()`` writes the set once into ``demo_root()`` (``$MMPRETRAIN_CACHE/demo/<version>``, default
``~/.cache/mmpretrain/demo/<version>``) and reuses it; ``demo_shards("images/train")`` lists shard paths
(the data layer resolves ``demo:images/train`` with it). The same seed gives byte-identical files.
Bump ``DEMO_VERSION`` whenever the output of the generator changes, so that caches are not reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmpretrain.data.writer import INDEX_NAME, ShardWriter

log = logging.getLogger("mmpretrain.data")

DEMO_VERSION = "v2"
MANIFEST = "demo.json"
SETS = ("images/train", "images/val", "text/train", "text/val")

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (250, 135, 20),
    "yellow": (245, 220, 40),
    "green": (40, 165, 60),
    "blue": (35, 85, 225),
    "purple": (145, 70, 195),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "dark grey": (62, 62, 62),
    "grey": (128, 128, 128),
    "light grey": (198, 198, 198),
    "dark blue": (22, 32, 95),
    "dark green": (20, 72, 40),
    "brown": (105, 66, 38),
    "beige": (228, 214, 178),
    "light blue": (165, 205, 238),
}
# circumradius as a fraction of the image side
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.18), "medium": (0.205, 0.24), "large": (0.265, 0.30)}
MAX_TILT = math.radians(15.0)  # shapes are turned by at most this much either way
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ZERO_SHOT_TEMPLATES = ["a {}.", "a picture of a {}.", "a coloured {} on a background.", "a small {}.", "a large {}."]
_MIN_CONTRAST = 110.0  # RGB distance between a shape's colour and its background's
_SUPERSAMPLE = 4  # shapes are drawn at 4x and reduced: smooth edges


@dataclass(frozen=True)
class DemoSizes:
    """How much to generate. The defaults are the demo set; tests make smaller ones."""

    image_size: int = 64
    train_shards: int = 8
    train_shard_size: int = 2000
    val_shards: int = 2
    val_shard_size: int = 250
    text_train_shards: int = 4
    text_train_shard_size: int = 500
    text_val_shards: int = 1
    text_val_shard_size: int = 250
    vocab_size: int = 4096

    def splits(self) -> dict[str, tuple[int, int]]:
        """(shards, samples per shard) of each set."""
        return {
            "images/train": (self.train_shards, self.train_shard_size),
            "images/val": (self.val_shards, self.val_shard_size),
            "text/train": (self.text_train_shards, self.text_train_shard_size),
            "text/val": (self.text_val_shards, self.text_val_shard_size),
        }


# -- randomness: every sample has its own generator, a pure function of (seed, set, index) -----------------
def _rng(*parts: Any) -> random.Random:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _labels(seed: int, split: str, index: int) -> int:
    """Class of sample ``index``: each run of len(SHAPES) samples holds every class once, in random order."""
    block, offset = divmod(index, len(SHAPES))
    order = list(range(len(SHAPES)))
    _rng(seed, split, "labels", block).shuffle(order)
    return order[offset]


# -- scenes ---------------------------------------------------------------------------------------------------
@dataclass
class Background:
    kind: str  # "solid", "gradient" or "noise"
    colors: tuple[str, ...]  # one name, or two for a gradient (from, to)
    direction: str = ""  # gradient: "vertical", "horizontal", "diagonal"
    noise: float = 0.0  # noise: standard deviation in 0..255

    @property
    def name(self) -> str:
        """Short description for the json member: "dark blue", "black to grey gradient", "noisy beige"."""
        if self.kind == "gradient":
            return f"{self.colors[0]} to {self.colors[1]} gradient"
        if self.kind == "noise":
            return f"noisy {self.colors[0]}"
        return self.colors[0]


@dataclass
class Scene:
    label: int
    color: str
    size: str
    position: str
    background: Background
    radius: float = 0.0  # in pixels of the final image
    cx: float = 0.0
    cy: float = 0.0
    angle: float = 0.0  # radians
    rgb: tuple[int, int, int] = (0, 0, 0)
    distractor: dict | None = None  # {"kind": "dot"|"line", "color": name, "rgb", "x", "y", "r", "angle"}

    @property
    def shape(self) -> str:
        return SHAPES[self.label]


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _contrasting_backgrounds(color: str) -> list[str]:
    return [b for b, rgb in BACKGROUND_COLORS.items() if _distance(rgb, COLORS[color]) >= _MIN_CONTRAST]


def sample_scene(rng: random.Random, label: int, image_size: int = 64) -> Scene:
    """Draw the attributes of one picture (geometry in pixels of an ``image_size`` image)."""
    color = rng.choice(list(COLORS))
    size = rng.choice(list(SIZES))
    position = rng.choice(POSITIONS)
    options = _contrasting_backgrounds(color)
    u = rng.random()
    if u < 0.45:
        background = Background("solid", (rng.choice(options),))
    elif u < 0.75 and len(options) >= 2:
        a, b = rng.sample(options, 2)
        background = Background("gradient", (a, b), direction=rng.choice(("vertical", "horizontal", "diagonal")))
    else:
        background = Background("noise", (rng.choice(options),), noise=rng.uniform(6.0, 18.0))
    s = float(image_size)
    lo_frac, hi_frac = SIZES[size]
    radius = rng.uniform(lo_frac, hi_frac) * s
    # the centre lies in the third of the feasible range that the position names
    lo, hi = radius + 1.0, s - 1.0 - radius
    third = (hi - lo) / 3.0
    row = 0 if position.startswith("top") else 2 if position.startswith("bottom") else 1
    col = 0 if position.endswith("left") else 2 if position.endswith("right") else 1
    cx = lo + third * (col + rng.uniform(0.1, 0.9))
    cy = lo + third * (row + rng.uniform(0.1, 0.9))
    scene = Scene(label, color, size, position, background, radius, cx, cy, rng.uniform(-MAX_TILT, MAX_TILT),
                  _jitter(rng, COLORS[color], 14))
    if rng.random() < 0.2:
        scene.distractor = _sample_distractor(rng, scene, s)
    return scene


def _sample_distractor(rng: random.Random, scene: Scene, s: float) -> dict | None:
    names = [c for c in COLORS if c != scene.color
             and all(_distance(COLORS[c], BACKGROUND_COLORS[b]) >= 80 for b in scene.background.colors)]
    if not names:
        return None
    r = rng.uniform(0.03, 0.05) * s
    for _ in range(20):
        x, y = rng.uniform(r + 1, s - r - 1), rng.uniform(r + 1, s - r - 1)
        if math.hypot(x - scene.cx, y - scene.cy) > scene.radius + 2.5 * r + 2:
            name = rng.choice(names)
            return {"kind": rng.choice(("dot", "line")), "color": name, "rgb": _jitter(rng, COLORS[name], 14),
                    "x": x, "y": y, "r": r, "angle": rng.uniform(0, math.pi)}
    return None


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape of circumradius ``r`` rotated by ``angle``; None for round shapes."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "diamond":  # a rhombus, clearly longer than wide (a square turned 45 degrees is a square)
        pts = [(0.0, -r), (0.58 * r, 0.0), (0.0, r), (-0.58 * r, 0.0)]
    elif shape == "cross":
        w, e = 0.32 * r, r * 0.95
        pts = [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    poly = shape_polygon(shape, cx, cy, r, angle)
    if poly is not None:
        draw.polygon(poly, fill=255)
        return
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    if shape == "ring":
        q = 0.56 * r
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)


def _background_array(bg: Background, size: int, rng: random.Random) -> np.ndarray:
    if bg.kind == "gradient":
        a = np.array(_jitter(rng, BACKGROUND_COLORS[bg.colors[0]], 8), dtype=np.float32)
        b = np.array(_jitter(rng, BACKGROUND_COLORS[bg.colors[1]], 8), dtype=np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        if bg.direction == "vertical":
            w = np.repeat(t[:, None], size, axis=1)
        elif bg.direction == "horizontal":
            w = np.repeat(t[None, :], size, axis=0)
        else:
            w = (t[:, None] + t[None, :]) / 2.0
        return a + (b - a) * w[..., None]
    base = np.array(_jitter(rng, BACKGROUND_COLORS[bg.colors[0]], 8), dtype=np.float32)
    arr = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if bg.kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(64))
        arr = arr + noise.normal(0.0, bg.noise, (size, size, 1)).astype(np.float32) \
            + noise.normal(0.0, bg.noise / 3.0, (size, size, 3)).astype(np.float32)
    return arr


def render_scene(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    """The picture of a scene as an RGB image of ``image_size`` pixels."""
    arr = _background_array(scene.background, image_size, rng)
    image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    k = _SUPERSAMPLE
    layers = [(SHAPES[scene.label], scene.cx, scene.cy, scene.radius, scene.angle, scene.rgb)]
    if scene.distractor is not None:
        d = scene.distractor
        layers.append((d["kind"], d["x"], d["y"], d["r"], d["angle"], d["rgb"]))
    for kind, x, y, r, angle, rgb in layers:
        mask = Image.new("L", (image_size * k, image_size * k), 0)
        draw = ImageDraw.Draw(mask)
        if kind == "dot":
            draw.ellipse(((x - r) * k, (y - r) * k, (x + r) * k, (y + r) * k), fill=255)
        elif kind == "line":
            dx, dy = 2.2 * r * math.cos(angle) * k, 2.2 * r * math.sin(angle) * k
            draw.line((x * k - dx, y * k - dy, x * k + dx, y * k + dy), fill=255, width=max(1, round(0.35 * r * k)))
        else:
            _draw_shape(draw, kind, x * k, y * k, r * k, angle)
        image.paste(rgb, mask=mask.reduce(k))
    return image


# -- captions -------------------------------------------------------------------------------------------------
_SIZE_WORDS = {"small": ("small", "small", "little"), "medium": ("medium", "medium-sized", "mid-sized"),
               "large": ("large", "large", "big")}
_POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left", "near the top left corner"),
    "top": ("at the top", "near the top edge", "in the top middle", "at the top centre"),
    "top right": ("in the top right corner", "at the top right", "in the upper right", "near the top right corner"),
    "left": ("on the left", "at the left side", "in the middle of the left side", "near the left edge"),
    "center": ("in the center", "in the middle", "at the centre of the image", "right in the middle"),
    "right": ("on the right", "at the right side", "in the middle of the right side", "near the right edge"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left", "near the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom edge", "in the bottom middle", "at the bottom centre"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right",
                     "near the bottom right corner"),
}

def _background_phrase(bg: Background, rng: random.Random) -> str:
    """'on a dark blue background', 'against a gradient from black to grey', 'over a noisy beige background'."""
    if bg.kind == "gradient":
        a, b = bg.colors
        return rng.choice((f"on a {a} to {b} gradient", f"against a gradient from {a} to {b}",
                           f"over a {a}-to-{b} gradient background"))
    c = bg.colors[0]
    if bg.kind == "noise":
        return rng.choice((f"on a noisy {c} background", f"over a grainy {c} background",
                           f"against a speckled {c} background", f"on a noisy {c} backdrop"))
    return rng.choice((f"on a {c} background", f"against a {c} background", f"over a plain {c} background",
                       f"on a {c} backdrop"))


def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeiou":
            words[i] += "n"
    return " ".join(words)


# how often a caption names each attribute besides the colour and the shape, which it always names
CAPTION_MENTIONS = {"size": 0.35, "position": 0.2, "background": 0.15}


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption in varied wording; always names colour and shape, sometimes size, position and background.

    The optional attributes are named rarely on purpose. A contrastive model tells a caption's picture from
    the others in its batch by whatever the caption names; when most captions also name a position and a
    background, colour plus position plus background already single the picture out, and the shapes (the
    demo's classes, and the hardest attribute to see) are never needed: zero-shot shape accuracy stayed at
    chance. Measured on a GPU stand-in of the CLIP demo (500 steps): every attribute in every caption gave
    0.15 to 0.18, colour and shape always with the rest rarely 0.30 to 0.37.
    """
    size = rng.choice(_SIZE_WORDS[scene.size]) if rng.random() < CAPTION_MENTIONS["size"] else None
    pos = rng.choice(_POSITION_PHRASES[scene.position]) if rng.random() < CAPTION_MENTIONS["position"] else None
    bg = _background_phrase(scene.background, rng) if rng.random() < CAPTION_MENTIONS["background"] else None
    color, shape = scene.color, scene.shape
    sized = f"{size} " if size else ""
    head = rng.choice((
        f"a {sized}{color} {shape}",
        f"a {sized}{color} {shape}",
        f"a {sized}{shape} in {color}",
        f"a {color} {shape}" + (f" ({size})" if size else ""),
        f"a {shape}, {size} and {color}," if size else f"a {shape} coloured {color}",
    ))
    prefix = rng.choice(("", "", "", "there is ", "a picture of ", "an image of ", "this shows "))
    text = prefix + head + "".join(f" {part}" for part in (pos, bg) if part)
    d = scene.distractor
    if d is not None and rng.random() < 0.25:
        text += rng.choice((f", with a speck of {d['color']} nearby", f" and a thin {d['color']} mark",
                            f", next to a tiny {d['color']} {d['kind']}"))
    text = _fix_articles(text.rstrip(","))
    if rng.random() < 0.35:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.35:
        text += "."
    return text


def image_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, Any]:
    """Sample ``index`` of an image split: {"__key__", "jpg", "txt", "cls", "json"}; a pure function of its arguments."""
    rng = _rng(seed, "images", split, index)
    label = _labels(seed, split, index)
    scene = sample_scene(rng, label, image_size)
    image = render_scene(scene, rng, image_size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    text = caption(scene, rng)
    meta = {"label": label, "class_name": scene.shape, "color": scene.color, "size": scene.size,
            "position": scene.position, "background": scene.background.name, "caption": text}
    return {"__key__": f"{split}{index:06d}", "jpg": buf.getvalue(), "txt": text, "cls": label, "json": meta}


# -- text corpus ----------------------------------------------------------------------------------------------
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("one hundred and twenty-three")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else (" and " if rest < 100 else " ") + number_words(rest))


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _scene_doc(rng: random.Random) -> str:
    n = rng.randint(2, 12)
    scenes = [sample_scene(rng, rng.randrange(len(SHAPES))) for _ in range(n)]
    out = [rng.choice(("Here is what the picture shows.", f"Picture number {rng.randint(1, 999)}.",
                       "A board with some shapes on it.", "Look at the shapes."))]
    for s in scenes:
        size, pos = rng.choice(_SIZE_WORDS[s.size]), rng.choice(_POSITION_PHRASES[s.position])
        out.append(rng.choice((f"A {size} {s.color} {s.shape} is {pos}.", f"There is a {size} {s.color} {s.shape} {pos}.",
                               f"{pos.capitalize()} there is a {s.color} {s.shape}, and it is {s.size}.")))
    out.append(f"The background is {scenes[0].background.name}." if scenes[0].background.kind != "gradient"
               else f"The background is a gradient from {scenes[0].background.colors[0]} to "
                    f"{scenes[0].background.colors[1]}.")
    counts: dict[str, int] = {}
    for s in scenes:
        counts[s.shape] = counts.get(s.shape, 0) + 1
    parts = [f"{number_words(c)} {shape if c == 1 else _plural(shape)}" for shape, c in counts.items()]
    out.append(f"In all there {'is' if n == 1 else 'are'} {number_words(n)} shapes: {_join(parts)}.")
    colors: dict[str, int] = {}
    for s in scenes:
        colors[s.color] = colors.get(s.color, 0) + 1
    color, c = max(colors.items(), key=lambda kv: kv[1])
    out.append(f"The most common colour is {color}, with {number_words(c)} {'shape' if c == 1 else 'shapes'}.")
    return _fix_articles(" ".join(out))


def _arithmetic_doc(rng: random.Random) -> str:
    out = [rng.choice(("Some sums.", "Arithmetic practice.", "Let us do some maths.", "Facts about numbers."))]
    words = rng.random() < 0.3
    for _ in range(rng.randint(8, 50)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            c = a * b
        else:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            if op == "-" and b > a:
                a, b = b, a
            c = a + b if op == "+" else a - b
        name = {"+": "plus", "-": "minus", "*": "times"}[op]
        if words:
            out.append(f"{number_words(a)} {name} {number_words(b)} is {number_words(c)}.")
        else:
            out.append(rng.choice((f"{a} {op} {b} = {c}.", f"{a} {name} {b} is {c}.", f"{a} {name} {b} equals {c}.")))
    return " ".join(out)


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _counting_doc(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 7)):
        kind = rng.randrange(5)
        if kind == 0:
            start, step, n = rng.randint(0, 200), rng.randint(1, 10), rng.randint(5, 20)
            out.append(f"Counting up from {start} by {step}: " + ", ".join(str(start + i * step) for i in range(n)) + ".")
        elif kind == 1:
            start, step = rng.randint(20, 300), rng.randint(1, 5)
            n = min(rng.randint(5, 20), start // step + 1)
            out.append(f"Counting down from {start} by {step}: " + ", ".join(str(start - i * step) for i in range(n)) + ".")
        elif kind == 2:
            start, n = rng.randint(1, 60), rng.randint(5, 15)
            out.append("In words: " + ", ".join(number_words(start + i) for i in range(n)) + ".")
        elif kind == 3:
            names, what = (_DAYS, "days") if rng.random() < 0.5 else (_MONTHS, "months")
            i, n = rng.randrange(len(names)), rng.randint(3, 2 * len(names))
            out.append(f"The {what} in order, starting with {names[i]}: "
                       + ", ".join(names[(i + k) % len(names)] for k in range(n)) + ".")
        else:
            i, n = rng.randrange(20), rng.randint(5, 26)
            out.append("The alphabet: " + " ".join(chr(97 + (i + k) % 26) for k in range(n)) + ".")
    return " ".join(out)


_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
          "Maya", "Noah", "Olga", "Paul"]
_THINGS = ["ball", "box", "book", "cup", "hat", "kite", "apple", "key", "shoe", "bag"]


def _story_doc(rng: random.Random) -> str:
    people = rng.sample(_NAMES, rng.randint(2, 5))
    owned: dict[str, list[str]] = {p: [] for p in people}
    items = []
    for p in people:
        for _ in range(rng.randint(1, 2)):
            item = f"{rng.choice(list(COLORS))} {rng.choice(_THINGS)}"
            if item not in items:
                items.append(item)
                owned[p].append(item)
    out = [f"{p} has {_join(['a ' + i for i in owned[p]])}." for p in people if owned[p]]
    for _ in range(rng.randint(1, 6)):
        givers = [p for p in people if owned[p]]
        giver = rng.choice(givers)
        taker = rng.choice([p for p in people if p != giver])
        item = rng.choice(owned[giver])
        owned[giver].remove(item)
        owned[taker].append(item)
        out.append(rng.choice((f"{giver} gives the {item} to {taker}.", f"{taker} takes the {item} from {giver}.")))
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            item = rng.choice(items)
            who = next(p for p in people if item in owned[p])
            out.append(f"Who has the {item}? {who} has the {item}.")
        else:
            p = rng.choice(people)
            has = _join(["a " + i for i in owned[p]]) if owned[p] else "nothing"
            out.append(f"What does {p} have? {p} has {has}.")
    return _fix_articles(" ".join(out))


_NOUNS = {"dog": "dogs", "cat": "cats", "bird": "birds", "child": "children", "farmer": "farmers",
          "robot": "robots", "fish": "fish", "horse": "horses", "teacher": "teachers", "mouse": "mice"}
_OBJECTS = ("ball", "tree", "river", "house", "garden", "bridge", "box", "hill", "road", "window")
_ADJECTIVES = ("big", "small", "old", "young", "happy", "quiet", "red", "green", "tall", "clever")
_VERBS = {"sees": "see", "likes": "like", "chases": "chase", "finds": "find", "watches": "watch", "follows": "follow"}
_INTRANSITIVE = {"sleeps": "sleep", "runs": "run", "sings": "sing", "waits": "wait", "jumps": "jump"}
_PREPOSITIONS = ("near", "under", "behind", "next to", "across", "over")


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(list(_NOUNS))
    det = rng.choice(("the", "two", "three", "some", "many")) if plural else rng.choice(("the", "a", "one", "every"))
    adj = " ".join(rng.sample(_ADJECTIVES, rng.choice((0, 0, 1, 1, 2))))
    return " ".join(w for w in (det, adj, _NOUNS[noun] if plural else noun) if w)


def _sentence(rng: random.Random) -> str:
    plural = rng.random() < 0.4
    subject = _noun_phrase(rng, plural)
    if rng.random() < 0.6:
        verb = rng.choice(list(_VERBS))
        words = [subject, _VERBS[verb] if plural else verb, _noun_phrase(rng, rng.random() < 0.4)]
    else:
        verb = rng.choice(list(_INTRANSITIVE))
        words = [subject, _INTRANSITIVE[verb] if plural else verb]
    if rng.random() < 0.5:
        words.append(f"{rng.choice(_PREPOSITIONS)} the {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}")
    text = _fix_articles(" ".join(words))
    return text[0].upper() + text[1:] + "."


def _grammar_doc(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 20)))


_FACTS = (
    "A triangle has three sides.", "A square has four sides.", "A hexagon has six sides.",
    "A star has five points.", "A circle has no corners.", "A ring is a circle with a hole in the middle.",
    "A diamond is taller than it is wide.", "A cross has four arms.", "Grass is green.", "The sky is blue.",
    "Snow is white.", "Bananas are yellow.", "Oranges are orange.", "Roses are red.", "A week has seven days.",
    "A year has twelve months.", "A day has twenty-four hours.", "An hour has sixty minutes.",
    "Water freezes at zero degrees.", "Ten is more than five.", "Two and two make four.", "Cats chase mice.",
    "Birds can fly.", "Fish live in water.", "The sun rises in the east.", "Night comes after day.",
    "Monday comes after Sunday.", "March comes after February.", "Red and blue make purple.",
    "Red and white make pink.", "Blue and yellow make green.", "Black is the darkest colour.",
)


def _facts_doc(rng: random.Random) -> str:
    return " ".join(rng.sample(_FACTS, rng.randint(5, 20)))


_DOC_KINDS = ((_scene_doc, 0.28), (_arithmetic_doc, 0.18), (_counting_doc, 0.14), (_story_doc, 0.18),
              (_grammar_doc, 0.14), (_facts_doc, 0.08))


def text_document(seed: int, split: str, index: int) -> dict[str, Any]:
    """Document ``index`` of a text split: {"__key__", "txt"}, from a few dozen to several hundred words."""
    rng = _rng(seed, "text", split, index)
    make = rng.choices([f for f, _ in _DOC_KINDS], weights=[w for _, w in _DOC_KINDS])[0]
    parts = [make(rng) for _ in range(rng.choice((1, 1, 1, 1, 2, 3, 4)))]  # some documents are long
    return {"__key__": f"{split}{index:06d}", "txt": "\n\n".join(parts)}


# -- writing the set ------------------------------------------------------------------------------------------
def generate_demo(output_dir: str | os.PathLike, seed: int = 0, sizes: DemoSizes | None = None) -> Path:
    """Write the whole demo set into ``output_dir`` (which should be empty): shards, tokenizer, manifest.

    Prefer :func:`ensure_demo`, which writes into a temporary directory and moves it into place.
    """
    from mmpretrain.data.tokenizer import train_bpe

    sizes = sizes or DemoSizes()
    out = Path(output_dir)
    start = time.perf_counter()
    files: dict[str, list[str]] = {}
    tokenizer_texts: list[str] = []
    for name, (shards, per_shard) in sizes.splits().items():
        kind, split = name.split("/")
        if kind == "images":
            metadata = {"kind": "image-text-label", "classes": list(SHAPES), "templates": ZERO_SHOT_TEMPLATES,
                        "colors": list(COLORS), "image_size": sizes.image_size}
        else:
            metadata = {"kind": "text"}
        metadata.update(source=f"mmpretrain demo {DEMO_VERSION}", seed=seed)
        with ShardWriter(out / kind, prefix=split, shard_size=per_shard, metadata=metadata) as writer:
            for i in range(shards * per_shard):
                if kind == "images":
                    sample = image_sample(seed, split, i, sizes.image_size)
                else:
                    sample = text_document(seed, split, i)
                if split == "train":
                    tokenizer_texts.append(sample["txt"])
                writer.write(sample)
        files[name] = [p.name for p in writer.paths]
    with _serial_tokenizers():
        train_bpe(tokenizer_texts, sizes.vocab_size, out / "tokenizer")
    # readable by everyone, like the shards (temporary directories and files are made private)
    for path in (out, out / "images", out / "text", out / "tokenizer"):
        os.chmod(path, 0o755)
    for path in (out / "images" / INDEX_NAME, out / "text" / INDEX_NAME):
        os.chmod(path, 0o644)
    manifest = {"version": DEMO_VERSION, "seed": seed, "sizes": asdict(sizes), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # written last: complete
    log.info("demo set written to %s in %.1f s", out, time.perf_counter() - start)
    return out


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Train without the tokenizers thread pool (unless the user chose): a process that forks dataloader
    workers after the pool ran warns in every worker."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def demo_root() -> Path:
    """Where the demo set lives: ``$MMPRETRAIN_CACHE/demo/<version>`` (default ``~/.cache/mmpretrain``)."""
    cache = os.environ.get("MMPRETRAIN_CACHE") or os.path.join("~", ".cache", "mmpretrain")
    return Path(os.path.expanduser(cache)) / "demo" / DEMO_VERSION


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete demo set at ``root``, or None when there is none (yet)."""
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): delete {root} or run "
                         "`python -m data_tools.make_demo --force`") from None


def _check(root: Path, manifest: dict, seed: int, sizes: DemoSizes) -> Path:
    want = {"version": DEMO_VERSION, "seed": seed, "sizes": asdict(sizes)}
    have = {k: manifest.get(k) for k in want}
    if have != want:
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        raise ValueError(f"{root} holds a different demo set (have, wanted: {diff}): give another directory, "
                         f"or replace it with `python -m data_tools.make_demo --output {root} --force`")
    return root


def ensure_demo(root: str | os.PathLike | None = None, seed: int = 0, sizes: DemoSizes | None = None,
                force: bool = False) -> Path:
    """The demo set's directory, generated on first use (default: :func:`demo_root`).

    Safe when several processes call it at once: each that finds no set waits for a lock on a sibling
    file (where the file system has locks), then generates into a temporary sibling directory and renames
    it into place; one whose rename loses to another process's discards its own. ``force`` regenerates.
    """
    sizes = sizes or DemoSizes()
    root = Path(root) if root is not None else demo_root()
    manifest = None if force else read_manifest(root)
    if manifest is not None:
        return _check(root, manifest, seed, sizes)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        manifest = None if force else read_manifest(root)
        if manifest is not None:  # another process made it while we waited
            return _check(root, manifest, seed, sizes)
        if not force and root.exists() and any(root.iterdir()):
            manifest = read_manifest(root)  # renamed into place just now, by a process that took no lock
            if manifest is not None:
                return _check(root, manifest, seed, sizes)
            raise ValueError(f"{root} exists but holds no complete demo set ({MANIFEST} is missing): delete it, "
                             f"or run `python -m data_tools.make_demo --output {root} --force`")
        log.info("generating the demo set into %s (once; it is reused afterwards)", root)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
        try:
            generate_demo(tmp, seed, sizes)
            if force and root.exists():
                old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
                os.rename(root, old / root.name)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, root)
            except OSError:
                manifest = read_manifest(root)
                if manifest is None:
                    raise
                return _check(root, manifest, seed, sizes)  # another process won the race: ours goes
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock where the file system has one; nothing otherwise (the rename still makes
    concurrent generation safe, only wasteful)."""
    try:
        import fcntl

        f = open(path, "a")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no locks here (some network file systems)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


def demo_shards(name: str, root: str | os.PathLike | None = None) -> list[str]:
    """Local shard paths of a demo set: ``"images/train"``, ``"images/val"``, ``"text/train"`` or ``"text/val"``."""
    from mmpretrain.data.shards import ShardError

    key = name.strip().strip("/")
    if key not in SETS:
        raise ShardError(f"unknown demo set 'demo:{name}': expected one of {', '.join('demo:' + s for s in SETS)}")
    directory = ensure_demo(root) if root is None else Path(root)
    manifest = read_manifest(directory)
    if manifest is None:
        raise ShardError(f"{directory} holds no demo set")
    kind = key.split("/")[0]
    return [str(directory / kind / f) for f in manifest["files"][key]]


def demo_tokenizer_dir(root: str | os.PathLike | None = None) -> Path:
    """The demo tokenizer's directory (a transformers tokenizer directory), generating the demo set if needed."""
    return (ensure_demo() if root is None else Path(root)) / "tokenizer"
