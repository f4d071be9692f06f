"""Image-label shards (``jpg`` + ``cls``, or a JSON field) for image classification."""

from __future__ import annotations

import random
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from mmpretrain.data.datamodule import ShardDataModule, Split
from mmpretrain.data.decode import SkipSample, decode_image, image_member, read_label
from mmpretrain.data.gpu_decode import (
    DecodeDevice,
    DeviceImagePlanner,
    EncodedImage,
    EncodedImageBatch,
    UnsupportedTransform,
    check_decode_device,
    finish_batch,
)


class ImageLabelDataModule(ShardDataModule):
    """Images with integer class labels, augmented with timm's ``create_transform`` inside the workers.

    Batches are ``{"image": float (B, 3, H, W), "label": long (B,), "key": list[str]}``.

    Args:
        image_size: side of the square training crop and evaluation image.
        image_key: the image member's extension, or ``"auto"`` (the first extension PIL reads).
        label_key: ``"cls"`` (an integer as text) or a JSON field (``"json:label"``; an int or a class name).
        num_classes: number of classes; default: from the shards' index.json (``classes``).
        class_names: class names in label order; default: from index.json, else ``class_0`` ...
        train_transform: keyword arguments for ``timm.data.create_transform(is_training=True)``, e.g.
            ``{auto_augment: rand-m9-mstd0.5-inc1, re_prob: 0.25, scale: [0.08, 1.0], hflip: 0.5}``.
        eval_transform: keyword arguments for the evaluation transform, e.g. ``{crop_pct: 0.875}``.
        mean, std: normalisation (default ImageNet's).
        decode_device: where JPEGs are decoded and augmented: ``"cpu"`` (in the workers, the default) or
            ``"cuda"`` (workers pass the encoded bytes and the augmentation drawn for each sample; the batch
            is decoded with nvJPEG and transformed on the training device after transfer, see
            :mod:`mmpretrain.data.gpu_decode`). The device path takes random-resized crops, flips and colour
            jitter; ``auto_augment`` and random erasing need ``"cpu"``.
        decode_verify: with ``decode_device: cuda``, check each JPEG in the worker by decoding it at 1/8 scale
            before it goes to nvJPEG (a corrupt one is skipped and counted, as on the CPU path; nvJPEG crashed
            the process on one instead). Set false only for shards checked beforehand (``inspect_shards``).
        **kwargs: shard, batching and worker options of :class:`ShardDataModule`.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        image_key: str = "auto",
        label_key: str = "cls",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        train_transform: dict[str, Any] | None = None,
        eval_transform: dict[str, Any] | None = None,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        decode_device: DecodeDevice = "cpu",
        decode_verify: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # into checkpoints (export needs the image size and normalisation); what is linked into the
        # model stays out: Lightning refuses hparams that differ between model and data
        self.save_hyperparameters(ignore=["num_classes", "class_names"])
        if image_size < 1:
            raise ValueError(f"data.image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.image_key = image_key
        self.label_key = label_key
        self._num_classes = num_classes
        self._class_names = class_names
        self.train_transform_args = dict(train_transform or {})
        self.eval_transform_args = dict(eval_transform or {})
        self.mean = tuple(mean)
        self.std = tuple(std)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names but data.num_classes is {num_classes}")
        for name, args in (("train_transform", self.train_transform_args), ("eval_transform", self.eval_transform_args)):
            try:
                create_transform(image_size, is_training=name == "train_transform", mean=self.mean, std=self.std, **args)
            except TypeError as err:
                raise ValueError(f"data.{name}: {err} (keys are timm.data.create_transform arguments)") from None
        check_decode_device(decode_device)
        self.decode_device = decode_device
        self.decode_verify = decode_verify
        if decode_device == "cuda":  # fail at configuration time, naming the transform, not in a worker
            self.transform(train=True)
            self.transform(train=False)

    # -- what the model needs to know (linked into the model by the CLI) ------------------------------------
    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            names = self.metadata.get("classes")
            if names is None:
                if self._num_classes is None:
                    raise ValueError(
                        "the number of classes is unknown: the shards have no index.json with 'classes'; "
                        "set data.num_classes (and data.class_names)"
                    )
                names = [f"class_{i}" for i in range(self._num_classes)]
            self._class_names = list(names)
        return self._class_names

    @property
    def num_classes(self) -> int:
        return self._num_classes if self._num_classes is not None else len(self.class_names)

    # -- pipeline ---------------------------------------------------------------------------------------------
    def transform(self, train: bool, split: Split | None = None):
        """The image transform; with ``decode_device: cuda`` its worker half (a planner)."""
        args = self.train_transform_args if train else self.eval_transform_args
        transform = create_transform(self.image_size, is_training=train, mean=self.mean, std=self.std, **args)
        if self.decode_device == "cpu":
            return transform
        try:
            return DeviceImagePlanner(transform, split or ("train" if train else "val"), verify=self.decode_verify)
        except UnsupportedTransform as err:
            field = "train_transform" if train else "eval_transform"
            raise ValueError(f"data.{field} with data.decode_device: cuda: {err}") from None

    def process(self, split: Split):
        decode = ImageLabelDecoder(
            self.transform(train=split == "train", split=split), self.class_names, self.image_key, self.label_key
        )
        return self.mapper(split, decode)

    def collate_fn(self):
        return collate_image_label

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode_device: cuda``: decode and augment the batch's JPEGs on its device."""
        if self.decode_device == "cpu" or not isinstance(batch, dict) or not isinstance(batch.get("image"),
                                                                                          EncodedImageBatch):
            return batch
        split = batch["image"].split
        return finish_batch(batch, self.mean, self.std, self.stats.get(split), self.strict)


class ImageLabelDecoder:
    """Raw sample -> (image tensor, label, "shard:key"); picklable, runs in the workers."""

    def __init__(self, transform, class_names: list[str], image_key: str, label_key: str) -> None:
        self.transform = transform
        self.class_to_index = {name: i for i, name in enumerate(class_names)}
        self.num_classes = len(class_names)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor | EncodedImage, int, str]:
        label = read_label(sample, self.label_key, self.class_to_index)
        if not 0 <= label < self.num_classes:
            raise SkipSample("bad_label", f"label {label} outside [0, {self.num_classes})")
        data = image_member(sample, self.image_key)
        if isinstance(self.transform, DeviceImagePlanner):  # device decoding: bytes and drawn augmentation
            image = self.transform.plan(data)
        else:
            image = self.transform(decode_image(data))
        return image, label, f"{sample['__url__']}:{sample['__key__']}"


def collate_image_label(items: list) -> dict[str, Any]:
    images, labels, keys = zip(*items)
    stacked = EncodedImageBatch(images) if isinstance(images[0], EncodedImage) else torch.stack(images)
    return {"image": stacked, "label": torch.tensor(labels, dtype=torch.long), "key": list(keys)}
