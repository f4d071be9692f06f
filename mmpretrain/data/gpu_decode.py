"""JPEG decoding and augmentation on the accelerator, for loaders whose CPU cores cannot keep a GPU fed.

With ``data.decode_device: cuda`` the image data modules split their timm transform in two halves:

- in the dataloader workers, :class:`DeviceImagePlanner` reads only the JPEG header (size, format) and draws
  the sample's random augmentation parameters -- crop box, interpolation, flips, colour jitter -- with the
  same generators, in the same order, as the CPU transform would (the stream seeds them per sample), so a
  sample gets the same crop whichever device decodes it. The worker hands on the encoded bytes and these
  parameters (:class:`EncodedImage`), a tenth of the bytes of a decoded float image.
- after the batch reaches the device, :func:`decode_batch` (called from the data module's
  ``on_after_batch_transfer``) decodes all JPEGs of the batch at once with ``torchvision.io.decode_jpeg``
  (nvJPEG on CUDA), applies crop, resize, flips, jitter and normalisation there, and puts the finished
  ``(B, 3, H, W)`` float tensor under ``"image"``: the batch has the format of the CPU path.

What the device half cannot take is done in the worker exactly as on the CPU path: images that are not
baseline/progressive RGB or grayscale JPEG (PNG, WebP, CMYK JPEG, files with bytes after the end marker)
are decoded and transformed there and travel finished. A JPEG that passes the header check but fails to
decode on the device is decoded by PIL in the main process; if PIL also fails, the sample is dropped from
its batch and counted as ``bad_image`` (the CPU path drops such samples before batching, so its batches stay
full; here that one batch is one sample short).

On a CPU device the same batched path decodes with ``decode_jpeg`` on the CPU and resizes with PIL, giving
exactly the CPU path's images (tested); on CUDA the resize is torch's antialiased interpolation, within a
level or two of 255 of PIL's.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from mmpretrain.data.decode import SkipSample, decode_image

log = logging.getLogger("mmpretrain.data")

DecodeDevice = Literal["cpu", "cuda"]
_TENSOR_INTERPOLATIONS = (InterpolationMode.NEAREST, InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
_JPEG_FORMATS = ("JPEG", "MPO")


class UnsupportedTransform(ValueError):
    """A transform step the device path cannot reproduce (names the step and the setting to change)."""


@dataclass
class EncodedImage:
    """One sample's image as a worker hands it on in ``decode_device: cuda`` mode.

    Either ``data`` (JPEG bytes, still to decode, with the parameters below) or ``image`` (a finished
    ``(3, H, W)`` float tensor: the worker decoded and transformed it on the CPU because the device path
    cannot take it).

    Attributes:
        data: the encoded JPEG.
        image: the finished image (fallback), else None.
        size: (height, width) from the JPEG header.
        crop: (top, left, height, width) of the random crop before resizing (training), else None.
        resize: the resize after the crop: (height, width) exactly, or an int for the shorter side.
        interpolation: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.
        center_crop: (height, width) of the centre crop after resizing (evaluation), else None.
        hflip, vflip: flip after resizing.
        jitter: colour jitter ``(order, brightness, contrast, saturation, hue)`` as torchvision's
            ``ColorJitter.get_params`` draws it (factors None where off), else None.
        split: the split the sample belongs to (whose skip counters a failure adds to).
    """

    data: bytes | None = None
    image: torch.Tensor | None = None
    size: tuple[int, int] = (0, 0)
    crop: tuple[int, int, int, int] | None = None
    resize: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"
    center_crop: tuple[int, int] | None = None
    hflip: bool = False
    vflip: bool = False
    jitter: tuple[tuple[int, ...], float | None, float | None, float | None, float | None] | None = None
    split: str = "train"


class EncodedImageBatch:
    """The images of one batch before device decoding (a plain container: Lightning's device transfer and
    DataLoader's memory pinning leave it alone, so the bytes stay in host memory where nvJPEG reads them)."""

    def __init__(self, items: Sequence[EncodedImage]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def split(self) -> str:
        return self.items[0].split if self.items else "train"

    def __repr__(self) -> str:
        encoded = sum(it.data is not None for it in self.items)
        return f"EncodedImageBatch({len(self.items)} images, {encoded} to decode)"


def jpeg_size(data: bytes, verify: bool = True) -> tuple[int, int] | None:
    """(height, width) of a JPEG that the device decoder can take, from its header; None otherwise.

    Accepted: JPEG (or MPO) in RGB or grayscale, starting with the SOI marker and ending with the EOI marker
    (a truncated file ends elsewhere). Anything else (another format, CMYK, trailing bytes) is None: such an
    image is decoded on the CPU like on the CPU path.

    ``verify``: also decode the image at 1/8 scale (libjpeg's DCT scaling: every scan is entropy-decoded, no full
    inverse transform, no resize), so that a JPEG whose tables or scan headers are broken after a valid frame
    header is caught here. nvJPEG crashed the process with a segmentation fault on such an image instead of
    raising (torchvision 0.26, CUDA 13, an H200, 2026-11-21); a JPEG that fails here goes to the CPU path, which
    skips and counts it. Garbage inside the entropy-coded data itself usually decodes without an error (to wrong
    pixels) in libjpeg, so this check does not catch it.
    """
    if len(data) < 4 or not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the markers up to the scan
            if img.format not in _JPEG_FORMATS or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            if verify:
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return height, width


def _interp_name(mode: Any) -> str:
    return mode.value if isinstance(mode, InterpolationMode) else str(mode)


def _check_interpolation(step: str, modes: Sequence[Any]) -> None:
    for mode in modes:
        if mode not in _TENSOR_INTERPOLATIONS:
            raise UnsupportedTransform(
                f"{step}: interpolation {_interp_name(mode)!r} has no GPU implementation; use bilinear, bicubic or "
                f"nearest (data.*_transform.interpolation), or data.decode_device: cpu"
            )


class DeviceImagePlanner:
    """The worker half of device decoding for one timm/torchvision transform (a ``Compose``).

    Calling it on a PIL image runs the CPU transform unchanged (so decoders that decode themselves keep
    working); :meth:`plan` turns image bytes into an :class:`EncodedImage`.

    Supported steps: ``RandomResizedCropAndInterpolation`` / ``RandomResizedCrop``, ``Resize``,
    ``CenterCrop``, ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``ColorJitter``, ``ToTensor`` /
    ``MaybeToTensor`` and ``Normalize`` (last): what timm's ``create_transform`` builds without
    ``auto_augment``, ``re_prob`` (random erasing), ``color_jitter_prob``, grayscale or blur.

    Args:
        transform: the CPU transform of the split (``torchvision.transforms.Compose``).
        split: the split's name (its skip counters count what fails on the device).
        verify: decode each JPEG at 1/8 scale here first (see :func:`jpeg_size`), so that a JPEG with broken
            tables or scan headers never reaches nvJPEG, which crashed on one; about 0.6 ms per 256-512 px
            photo, against about 1 ms for a full decode and 2.5 ms for the whole CPU path. Turn off only for
            shards checked beforehand.

    Raises:
        UnsupportedTransform: naming the first step the device path cannot reproduce.
    """

    def __init__(self, transform: Callable, split: str = "train", verify: bool = True) -> None:
        self.transform = transform
        self.split = split
        self.verify = verify
        steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
        self.steps: list[Any] = []
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        tensor_seen = False
        for step in steps:
            name = type(step).__name__
            if isinstance(step, (MaybeToTensor, T.ToTensor)):
                tensor_seen = True
            elif isinstance(step, T.Normalize):
                if not tensor_seen:
                    raise UnsupportedTransform(f"{name} before ToTensor is not supported on the device path")
                self.mean, self.std = tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
            elif tensor_seen:
                raise UnsupportedTransform(
                    f"transform step {name} after ToTensor (random erasing?) has no GPU implementation here; "
                    f"drop it (re_prob: 0) or set data.decode_device: cpu"
                )
            elif isinstance(step, (RandomResizedCropAndInterpolation, T.RandomResizedCrop)):
                modes = step.interpolation if isinstance(step.interpolation, (tuple, list)) else [step.interpolation]
                _check_interpolation(name, modes)
                self.steps.append(step)
            elif isinstance(step, T.Resize):
                _check_interpolation(name, [step.interpolation])
                if step.max_size is not None:
                    raise UnsupportedTransform(f"{name}(max_size=...) is not supported on the device path")
                self.steps.append(step)
            elif isinstance(step, (T.CenterCrop, T.RandomHorizontalFlip, T.RandomVerticalFlip, T.ColorJitter)):
                self.steps.append(step)
            else:
                raise UnsupportedTransform(
                    f"transform step {name} has no GPU implementation (auto_augment, color_jitter_prob, "
                    f"grayscale, blur and other crop modes need data.decode_device: cpu)"
                )
        if not tensor_seen:
            raise UnsupportedTransform("the transform does not end in a tensor (ToTensor); device decoding needs one")
        kinds = [type(s) for s in self.steps]
        crops = [s for s in self.steps if isinstance(s, (RandomResizedCropAndInterpolation, T.RandomResizedCrop))]
        resizes = [s for s in self.steps if isinstance(s, T.Resize)]
        if len(crops) + len(resizes) != 1 or (crops and T.CenterCrop in kinds):
            raise UnsupportedTransform(
                f"the device path takes one random-resized crop, or one resize then a centre crop; got {kinds}"
            )
        # the device half applies crop/resize, centre crop, flips, jitter in this order: so must the transform
        geometric = [i for i, s in enumerate(self.steps) if isinstance(s, (T.Resize, T.CenterCrop)) or s in crops]
        others = [i for i in range(len(self.steps)) if i not in geometric]
        if others and geometric and min(others) < max(geometric):
            raise UnsupportedTransform(f"flips or colour jitter before the crop/resize are not supported: {kinds}")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img)

    def plan(self, data: bytes) -> EncodedImage:
        """The encoded image with its augmentation drawn (in a worker, after the stream seeded the sample).

        Not a JPEG the device decodes (see :func:`jpeg_size`): decoded and transformed here, on the CPU path.
        Raises :class:`SkipSample` for an image PIL cannot decode, as the CPU path does.
        """
        size = jpeg_size(data, verify=self.verify)
        if size is None:
            return EncodedImage(image=self.transform(decode_image(data)), split=self.split)
        height, width = size
        out = EncodedImage(data=data, size=size, split=self.split)
        for step in self.steps:
            if isinstance(step, (RandomResizedCropAndInterpolation, T.RandomResizedCrop)):
                # the draws of the CPU transform, in its order: crop box (Python's random), then interpolation
                box = _rrc_params(step, width, height)
                interp = step.interpolation
                if isinstance(interp, (tuple, list)):
                    interp = random.choice(interp)
                out.crop = box
                out.resize = tuple(step.size) if isinstance(step.size, (tuple, list)) else (step.size, step.size)
                out.interpolation = _interp_name(interp)
            elif isinstance(step, T.Resize):
                size_arg = step.size
                if isinstance(size_arg, (tuple, list)) and len(size_arg) == 1:
                    size_arg = size_arg[0]
                out.resize = tuple(size_arg) if isinstance(size_arg, (tuple, list)) else int(size_arg)
                out.interpolation = _interp_name(step.interpolation)
            elif isinstance(step, T.CenterCrop):
                out.center_crop = tuple(step.size)  # type: ignore[assignment]
            elif isinstance(step, T.RandomHorizontalFlip):
                if torch.rand(1) < step.p:
                    out.hflip = not out.hflip
            elif isinstance(step, T.RandomVerticalFlip):
                if torch.rand(1) < step.p:
                    out.vflip = not out.vflip
            elif isinstance(step, T.ColorJitter):
                order, b, c, s, h = step.get_params(step.brightness, step.contrast, step.saturation, step.hue)
                if any(f is not None for f in (b, c, s, h)):
                    out.jitter = (tuple(int(i) for i in order), b, c, s, h)
        return out


def _rrc_params(step: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """The crop box of a random-resized crop for an image of this size, with the step's own draws."""
    shape = torch.empty((0, height, width), dtype=torch.uint8)  # get_params reads only the size
    if isinstance(step, RandomResizedCropAndInterpolation):
        i, j, h, w = step.get_params(shape, step.scale, step.ratio)
    else:
        i, j, h, w = T.RandomResizedCrop.get_params(shape, list(step.scale), list(step.ratio))
    return int(i), int(j), int(h), int(w)


# -- the device half -------------------------------------------------------------------------------------------
def _decode_all(items: list[EncodedImage], device: torch.device) -> list[torch.Tensor | None]:
    """Decode the JPEGs of ``items`` on ``device`` (one batched call); None where decoding failed."""
    tensors = [torch.frombuffer(bytearray(it.data), dtype=torch.uint8) for it in items]  # type: ignore[arg-type]
    dev = "cuda" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                pass  # one bad image fails the whole batch: decode one by one to find it
    out: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=dev if dev == "cpu" else device))
        except RuntimeError:
            out.append(None)
    return out


def _apply_pil(img: Image.Image, it: EncodedImage) -> Image.Image:
    """The geometric and colour steps on a PIL image: exactly what the CPU transform does with these draws."""
    interp = InterpolationMode(it.interpolation)
    if it.crop is not None:
        img = TF.resized_crop(img, *it.crop, list(it.resize), interp)  # type: ignore[arg-type]
    elif it.resize is not None:
        img = TF.resize(img, list(it.resize) if isinstance(it.resize, tuple) else it.resize, interp)
    if it.center_crop is not None:
        img = TF.center_crop(img, list(it.center_crop))
    if it.hflip:
        img = TF.hflip(img)
    if it.vflip:
        img = TF.vflip(img)
    if it.jitter is not None:
        img = _jitter(img, it.jitter)
    return img


def _jitter(img: Any, jitter: tuple) -> Any:
    order, b, c, s, h = jitter
    for fn_id in order:
        if fn_id == 0 and b is not None:
            img = TF.adjust_brightness(img, b)
        elif fn_id == 1 and c is not None:
            img = TF.adjust_contrast(img, c)
        elif fn_id == 2 and s is not None:
            img = TF.adjust_saturation(img, s)
        elif fn_id == 3 and h is not None:
            img = TF.adjust_hue(img, h)
    return img


def _resize_tensor(img: torch.Tensor, it: EncodedImage) -> torch.Tensor:
    """Crop, resize and centre-crop a decoded ``(3, H, W)`` uint8 tensor on the device: float ``(3, h, w)``
    holding 0..255, not yet rounded (the caller rounds the whole batch at once, as PIL rounds its output)."""
    interp = InterpolationMode(it.interpolation)
    if it.crop is not None:
        top, left, h, w = it.crop
        img = img[:, top : top + h, left : left + w]
    img = img.float()
    if it.resize is not None:
        size = list(it.resize) if isinstance(it.resize, tuple) else [it.resize]
        img = TF.resize(img, size, interp, antialias=interp != InterpolationMode.NEAREST)
    if it.center_crop is not None:
        img = TF.center_crop(img, list(it.center_crop))
    return img


def _finish_tensors(images: list[torch.Tensor], plans: list[EncodedImage], mean: torch.Tensor,
                    std: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels, flip, jitter and normalise resized images, batched where the steps allow."""
    x = torch.stack(images).round_().clamp_(0, 255)
    device = x.device
    for attr, dim in (("hflip", -1), ("vflip", -2)):
        rows = [k for k, it in enumerate(plans) if getattr(it, attr)]
        if rows:
            index = torch.tensor(rows, device=device)
            x[index] = x[index].flip(dim)
    for k, it in enumerate(plans):
        if it.jitter is not None:  # per image, in 8 bits like PIL's enhancers
            x[k] = _jitter(x[k].to(torch.uint8), it.jitter).float()
    return x.div_(255).sub_(mean).div_(std)


def decode_batch(
    images: EncodedImageBatch,
    device: torch.device | str,
    mean: Sequence[float],
    std: Sequence[float],
    on_bad: Callable[[int, str], None] | None = None,
    tensor_ops: bool | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Decode and transform a batch's images on ``device``.

    Args:
        images: what the workers made (:class:`EncodedImageBatch`).
        device: where to decode: a CUDA device (nvJPEG, batched), or the CPU (libjpeg, then PIL's resize:
            exactly the CPU path's images).
        mean, std: normalisation, as the CPU transform's ``Normalize``.
        on_bad: called with (index in the batch, reason) for an image that decodes nowhere; it may raise.
        tensor_ops: resize, flip and jitter with torch tensor operations (what runs on CUDA) rather than with
            PIL; default: on CUDA only. (Tensor operations on a CPU device test the CUDA path's arithmetic.)

    Returns:
        ``(images (N, 3, H, W) float32 on device, kept)``: ``kept`` lists the batch indices of the N images
        (all of them unless some failed to decode).
    """
    device = torch.device(device)
    items = images.items
    todo = [i for i, it in enumerate(items) if it.data is not None]
    decoded = dict(zip(todo, _decode_all([items[i] for i in todo], device))) if todo else {}
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    use_tensors = device.type != "cpu" if tensor_ops is None else tensor_ops
    finished: dict[int, torch.Tensor] = {}  # index -> final image (worker fallbacks, the CPU device)
    resized: dict[int, torch.Tensor] = {}  # index -> resized, still to finish as a batch (CUDA)
    for i, it in enumerate(items):
        if it.data is None:
            assert it.image is not None
            finished[i] = it.image.to(device, non_blocking=True)
            continue
        img = decoded.get(i)
        if img is None:  # the device decoder refused it: the CPU path's decoder decides
            try:
                pil = decode_image(it.data)
            except SkipSample as err:
                if on_bad is not None:
                    on_bad(i, str(err))
                continue
            img = TF.pil_to_tensor(pil)
            if device.type == "cuda":
                img = img.to(device, non_blocking=True)
        if not use_tensors:
            pil = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")
            finished[i] = TF.to_tensor(_apply_pil(pil, it)).sub_(mean_t).div_(std_t)
        else:
            resized[i] = _resize_tensor(img, it)
    if resized:
        order = list(resized)
        done = _finish_tensors([resized[i] for i in order], [items[i] for i in order], mean_t, std_t)
        finished.update(zip(order, done.unbind(0)))
    kept = sorted(finished)
    if not kept:
        return torch.empty((0, 3, 0, 0), device=device), kept
    return torch.stack([finished[i] for i in kept]), kept


def select_rows(batch: dict[str, Any], kept: list[int], size: int) -> dict[str, Any]:
    """The batch restricted to rows ``kept`` (of ``size``): tensors indexed along dim 0, lists filtered."""
    if len(kept) == size:
        return batch
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[name] = value[torch.tensor(kept, dtype=torch.long, device=value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[name] = [value[i] for i in kept]
        else:
            out[name] = value
    return out


def batch_device(batch: dict[str, Any]) -> torch.device:
    """The device the batch's tensors were moved to (the CPU when it holds none)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def check_decode_device(decode_device: str) -> None:
    if decode_device not in ("cpu", "cuda"):
        raise ValueError(f"data.decode_device must be 'cpu' or 'cuda', got {decode_device!r}")


__all__ = [
    "DecodeDevice",
    "DeviceImagePlanner",
    "EncodedImage",
    "EncodedImageBatch",
    "UnsupportedTransform",
    "batch_device",
    "check_decode_device",
    "decode_batch",
    "finish_batch",
    "jpeg_size",
    "select_rows",
]


def finish_batch(
    batch: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    stats: Any = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Decode a batch's :class:`EncodedImageBatch` (under ``"image"``) on the device of its other tensors.

    The data modules call this from ``on_after_batch_transfer``. Batches without encoded images pass
    unchanged. An image that decodes nowhere is counted in ``stats`` (the split's
    :class:`~mmpretrain.data.stats.DataStats`) as ``bad_image`` and its sample dropped from the batch; with
    ``strict`` it raises :class:`~mmpretrain.data.shards.ShardReadError` naming the shard and key instead.
    """
    images = batch.get("image")
    if not isinstance(images, EncodedImageBatch):
        return batch
    keys = batch.get("key") or [None] * len(images)
    split = images.split

    def on_bad(index: int, reason: str) -> None:
        from mmpretrain.data.shards import ShardReadError

        if strict:
            raise ShardReadError(f"{split}: {keys[index]}: {reason}")
        if stats is not None:
            stats.add("bad_image")
        log.warning("%s: dropping sample %s from its batch: its image decodes on no device (%s)", split,
                    keys[index], reason)

    size = len(images)
    decoded, kept = decode_batch(images, batch_device(batch), mean, std, on_bad)
    out = select_rows({k: v for k, v in batch.items() if k != "image"}, kept, size)
    return {"image": decoded, **out}
