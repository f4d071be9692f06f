"""Image-text pairs (``jpg`` + ``txt``, or a caption field of the ``json`` member) for contrastive pretraining."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, create_transform

from mmpretrain.data.datamodule import ShardDataModule, Split
from mmpretrain.data.decode import SkipSample, decode_image, image_member, read_label, read_text
from mmpretrain.data.gpu_decode import (
    DecodeDevice,
    DeviceImagePlanner,
    EncodedImage,
    EncodedImageBatch,
    UnsupportedTransform,
    check_decode_device,
    finish_batch,
)
from mmpretrain.data.tokenizer import Tokenizer

log = logging.getLogger("mmpretrain.data")

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


class ImageTextDataModule(ShardDataModule):
    """Images with captions, tokenized in the workers.

    Batches are ``{"image": float (B, 3, H, W), "input_ids": long (B, context_length), "key": list[str]}``,
    plus ``"label"`` (long, -1 where absent) when ``label_key`` is set, for zero-shot evaluation.

    Args:
        tokenizer: a local tokenizer directory (``tokenizer.json``, or any transformers tokenizer
            directory), or ``"demo"`` for the demo set's tokenizer. Never downloaded.
        context_length: tokens per caption (padded, truncated keeping the end-of-text token).
        image_size: side of the square training crop and evaluation image.
        image_key: the image member's extension, or ``"auto"``.
        caption_key: ``"txt"`` or a JSON field (``"json:caption"``); a list of captions is sampled from.
        label_key: where evaluation samples keep a class label (``"cls"``, ``"json:label"``) for zero-shot
            classification, or None.
        class_names: zero-shot class names; default: ``classes`` from the shards' index.json.
        templates: zero-shot prompt templates with ``{}``; default: index.json's ``templates`` or generic ones.
        train_transform, eval_transform: keyword arguments for ``timm.data.create_transform``.
        mean, std: normalisation (default OpenAI CLIP's).
        decode_device: where JPEGs are decoded and augmented: ``"cpu"`` (in the workers, the default) or
            ``"cuda"`` (workers pass the encoded bytes and the augmentation drawn for each sample; the batch
            is decoded with nvJPEG and transformed on the training device after transfer, see
            :mod:`mmpretrain.data.gpu_decode`). For when the CPU cores cannot keep the GPU fed.
        decode_verify: with ``decode_device: cuda``, check each JPEG in the worker by decoding it at 1/8 scale
            before it goes to nvJPEG (a corrupt one is skipped and counted, as on the CPU path; nvJPEG crashed
            the process on one instead). Set false only for shards checked beforehand (``inspect_shards``).
        **kwargs: shard, batching and worker options of :class:`ShardDataModule`.
    """

    def __init__(
        self,
        *,
        tokenizer: str = "demo",
        context_length: int = 77,
        image_size: int = 224,
        image_key: str = "auto",
        caption_key: str = "txt",
        label_key: str | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        train_transform: dict[str, Any] | None = None,
        eval_transform: dict[str, Any] | None = None,
        mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        std: tuple[float, float, float] = OPENAI_CLIP_STD,
        decode_device: DecodeDevice = "cpu",
        decode_verify: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # into checkpoints (export needs the image size and normalisation); what is linked into the
        # model stays out: Lightning refuses hparams that differ between model and data
        self.save_hyperparameters(ignore=["class_names"])
        if context_length < 2:
            raise ValueError(f"data.context_length must be at least 2, got {context_length}")
        self.tokenizer_path = tokenizer
        self.tokenizer = Tokenizer.from_dir(tokenizer)
        self.context_length = context_length
        self.image_size = image_size
        self.image_key = image_key
        self.caption_key = caption_key
        self.label_key = label_key
        self._class_names = class_names
        self._templates = templates
        self.train_transform_args = dict(train_transform or {})
        self.eval_transform_args = dict(eval_transform or {})
        self.mean, self.std = tuple(mean), tuple(std)
        for t in templates or []:
            if "{}" not in t:
                raise ValueError(f"data.templates: {t!r} has no '{{}}' for the class name")
        check_decode_device(decode_device)
        self.decode_device = decode_device
        self.decode_verify = decode_verify
        self._warned_predecoded = False
        if decode_device == "cuda":  # fail at configuration time, naming the transform, not in a worker
            for split in ("train", "val"):
                self.transform(split)

    def transform(self, split: Split):
        """The split's image transform; with ``decode_device: cuda`` its worker half (a planner)."""
        args = self.train_transform_args if split == "train" else self.eval_transform_args
        transform = create_transform(self.image_size, is_training=split == "train", mean=self.mean, std=self.std, **args)
        if self.decode_device == "cpu":
            return transform
        try:
            return DeviceImagePlanner(transform, split, verify=self.decode_verify)
        except UnsupportedTransform as err:
            field = "train_transform" if split == "train" else "eval_transform"
            raise ValueError(f"data.{field} with data.decode_device: cuda: {err}") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def class_names(self) -> list[str] | None:
        if self._class_names is None:
            self._class_names = self.metadata.get("classes")
        return self._class_names

    @property
    def templates(self) -> list[str]:
        if self._templates is None:
            self._templates = list(self.metadata.get("templates") or DEFAULT_TEMPLATES)
        return self._templates

    def zero_shot_prompts(self) -> torch.Tensor | None:
        """Token ids (classes, templates, context_length) of every class name in every template."""
        if not self.class_names:
            return None
        texts = [t.format(name) for name in self.class_names for t in self.templates]
        ids = self.tokenizer.encode_batch(texts, self.context_length)
        return ids.view(len(self.class_names), len(self.templates), self.context_length)

    def process(self, split: Split):
        transform = self.transform(split)
        label_key = self.label_key if split != "train" else None
        classes = {n: i for i, n in enumerate(self.class_names or [])}
        decode = ImageTextDecoder(transform, self.tokenizer, self.context_length, self.image_key, self.caption_key,
                                  label_key, classes)
        return self.mapper(split, decode)

    def collate_fn(self):
        return collate_image_text

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode_device: cuda``: decode and augment the batch's JPEGs on its device."""
        if self.decode_device == "cpu" or not isinstance(batch, dict):
            return batch
        if not isinstance(batch.get("image"), EncodedImageBatch):
            if not self._warned_predecoded:
                self._warned_predecoded = True
                log.warning("data.decode_device is cuda but %s decodes its images in the workers; the images "
                            "arrive decoded", type(self).__name__)
            return batch
        split = batch["image"].split
        return finish_batch(batch, self.mean, self.std, self.stats.get(split), self.strict)


class ImageTextDecoder:
    """Raw sample -> dict(image, input_ids, key[, label]); picklable, runs in the workers."""

    def __init__(self, transform, tokenizer: Tokenizer, context_length: int, image_key: str, caption_key: str,
                 label_key: str | None, class_to_index: dict[str, int]) -> None:
        self.transform = transform
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.image_key = image_key
        self.caption_key = caption_key
        self.label_key = label_key
        self.class_to_index = class_to_index

    def image(self, sample: dict) -> torch.Tensor | EncodedImage:
        """The transformed image, or (device decoding) the encoded image with its augmentation drawn."""
        data = image_member(sample, self.image_key)
        if isinstance(self.transform, DeviceImagePlanner):
            return self.transform.plan(data)
        return self.transform(decode_image(data))

    def __call__(self, sample: dict, rng: random.Random) -> dict[str, Any]:
        caption = read_text(sample, self.caption_key, rng, what="caption")
        item = {
            "image": self.image(sample),
            "input_ids": self.tokenizer.encode_batch([caption], self.context_length)[0],
            "key": f"{sample['__url__']}:{sample['__key__']}",
        }
        if self.label_key is not None:
            try:
                item["label"] = read_label(sample, self.label_key, self.class_to_index)
            except SkipSample:
                item["label"] = -1
        return item


def collate_image_text(items: list[dict]) -> dict[str, Any]:
    """Stack the samples' tensors (image, input_ids, and doc_ids where there are), labels into a long
    tensor, keys into a list; encoded images (device decoding) into an :class:`EncodedImageBatch`."""
    batch: dict[str, Any] = {}
    for name, value in items[0].items():
        if isinstance(value, EncodedImage):
            batch[name] = EncodedImageBatch([it[name] for it in items])
        elif isinstance(value, torch.Tensor):
            batch[name] = torch.stack([it[name] for it in items])
        elif name == "label":
            batch[name] = torch.tensor([it[name] for it in items], dtype=torch.long)
        else:
            batch[name] = [it[name] for it in items]
    return batch
