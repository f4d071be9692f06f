"""Byte-level BPE tokenizers: training one, and the small wrapper the data modules tokenize with.

``train_bpe`` writes a directory that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), so a model exported to
Hugging Face format can ship the same tokenizer. ``Tokenizer`` wraps a ``tokenizers.Tokenizer`` with the
few things training needs: the special token ids, ``encode`` and a fixed-length ``encode_batch``. It
pickles (data modules hand it to dataloader workers) and never downloads anything.

The wrapper only uses the Rust tokenizer's serial ``encode``: its parallel ``encode_batch`` starts a thread
pool, and a process that forks dataloader workers after that prints warnings and loses the pool anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)

# what other tokenizers call their special tokens, tried when a directory's configuration names none
_EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
_BOS_NAMES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    eos_token: str = EOS_TOKEN,
    bos_token: str | None = BOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2 style, no unknown tokens) and save it to ``output_dir``.

    Args:
        texts: the training texts (any iterable; read once).
        vocab_size: the vocabulary size to reach, special tokens included. A small corpus may stop
            earlier, when no pair of tokens is left to merge.
        output_dir: where ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` go.
        special_tokens: added first, with ids 0, 1, 2 ... in this order; must include the tokens below.
        eos_token: end of text (appended to documents and captions).
        bos_token: beginning of text; None to use ``eos_token`` (as GPT-2 does).
        pad_token: padding; None to pad with ``eos_token``.
        min_frequency: the fewest occurrences for a pair to be merged.
        model_max_length: recorded in ``tokenizer_config.json`` for transformers; None for no limit.

    The result depends only on the texts and the arguments: the same input gives the same files.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 256 + "
                         f"{len(special_tokens)} special tokens")
    special_tokens = list(dict.fromkeys(special_tokens))
    for name, token in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{name} {token!r} is not among special_tokens {special_tokens}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return save_tokenizer(tok, output_dir, eos_token=eos_token, bos_token=bos_token, pad_token=pad_token,
                          model_max_length=model_max_length)


def save_tokenizer(
    tok: RustTokenizer,
    output_dir: str | os.PathLike,
    eos_token: str = EOS_TOKEN,
    bos_token: str | None = BOS_TOKEN,
    pad_token: str | None = PAD_TOKEN,
    model_max_length: int | None = None,
) -> Path:
    """Write a ``tokenizers.Tokenizer`` as a transformers tokenizer directory (loads with AutoTokenizer)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    special = {"eos_token": eos_token, "bos_token": bos_token or eos_token, "pad_token": pad_token or eos_token}
    # written by hand rather than by transformers' save_pretrained, whose tokenizer_class differs between
    # transformers 4 and 5: PreTrainedTokenizerFast loads in both
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    tok.save(str(output_dir / "tokenizer.json"), pretty=True)
    _write_json(output_dir / "tokenizer_config.json", config)
    _write_json(output_dir / "special_tokens_map.json", special)
    return output_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


class Tokenizer:
    """The tokenizer the data modules use: special ids, ``encode``, fixed-length ``encode_batch``, ``decode``.

    Build it with :meth:`from_dir`. Encoding never adds special tokens by itself (whatever the
    directory's post-processor says); ``encode_batch`` adds beginning and end of text as asked.
    """

    def __init__(self, tokenizer: RustTokenizer, eos_id: int, bos_id: int | None = None, pad_id: int | None = None,
                 path: str | None = None) -> None:
        self._tok = tokenizer
        self.eos_id = int(eos_id)
        self.bos_id = int(eos_id if bos_id is None else bos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.path = path
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        # what an embedding table must cover: ids need not be contiguous in every tokenizer
        self._vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a local tokenizer: ``"demo"`` (the demo set's), a directory with ``tokenizer.json`` (its
        ``tokenizer_config.json``/``special_tokens_map.json`` name the special tokens), a ``tokenizer.json``
        file, or any local transformers tokenizer directory with a fast tokenizer. Never downloads.
        """
        if isinstance(path, Tokenizer):
            return path
        if str(path) == "demo":
            from mmpretrain.data.demo import demo_tokenizer_dir

            path = demo_tokenizer_dir()
        p = Path(os.path.expanduser(str(path)))
        if p.is_file() and p.suffix == ".json":
            directory, file = p.parent, p
        elif p.is_dir():
            directory, file = p, p / "tokenizer.json"
        elif p.exists():
            raise ValueError(f"tokenizer {str(path)!r} is a file but not a tokenizer.json; give its directory")
        else:
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist: give a local directory with a tokenizer.json "
                "(make one with `python -m data_tools.train_tokenizer`), or 'demo' for the demo tokenizer. "
                "Tokenizers are never downloaded."
            )
        if file.is_file():
            try:
                tok = RustTokenizer.from_file(str(file))
            except Exception as err:
                raise ValueError(f"tokenizer {str(file)!r} does not load: {err}") from None
            names = _special_token_names(directory)
            return cls._with_specials(tok, names, str(path))
        return cls._from_transformers(directory, str(path))

    @classmethod
    def _with_specials(cls, tok: RustTokenizer, names: dict[str, str | None], where: str) -> Tokenizer:
        vocab = tok.get_vocab(with_added_tokens=True)

        def find(key: str, fallbacks: Sequence[str]) -> int | None:
            name = names.get(key)
            if name is not None:
                if name not in vocab:
                    raise ValueError(f"tokenizer {where!r}: its {key} {name!r} is not in the vocabulary")
                return vocab[name]
            return next((vocab[n] for n in fallbacks if n in vocab), None)

        eos = find("eos_token", _EOS_NAMES)
        if eos is None:
            raise ValueError(
                f"tokenizer {where!r} has no end-of-text token: name one as eos_token in its tokenizer_config.json "
                f"(none of {list(_EOS_NAMES)} is in its vocabulary)"
            )
        return cls(tok, eos, find("bos_token", _BOS_NAMES), find("pad_token", _PAD_NAMES), where)

    @classmethod
    def _from_transformers(cls, directory: Path, where: str) -> Tokenizer:
        markers = ("tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
        if not any((directory / m).is_file() for m in markers):
            raise FileNotFoundError(
                f"{where!r} holds no tokenizer: expected a tokenizer.json (or transformers tokenizer files such as "
                f"{', '.join(markers)}). Make one with `python -m data_tools.train_tokenizer --output {where}`."
            )
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
        except Exception as err:
            raise ValueError(f"tokenizer directory {where!r} does not load with transformers: {err}") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer directory {where!r} has only a slow (Python) tokenizer; save it with a "
                             "tokenizer.json (load it in transformers and save_pretrained with a fast tokenizer)")
        names = {"eos_token": hf.eos_token, "bos_token": hf.bos_token, "pad_token": hf.pad_token}
        return cls._with_specials(backend, names, where)

    @property
    def vocab_size(self) -> int:
        """Size of an embedding table for these ids (added tokens included)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], context_length: int, add_bos: bool = True,
                     add_eos: bool = True) -> torch.Tensor:
        """Token ids ``(len(texts), context_length)``: ``[bos] ids [eos]`` padded with ``pad_id``.

        Longer texts are cut, keeping the end-of-text token as the last token (as CLIP does), so that
        models pooling at the end-of-text token always find it.
        """
        if context_length < 1:
            raise ValueError(f"context_length must be positive, got {context_length}")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        head = [self.bos_id] if add_bos else []
        for i, text in enumerate(texts):
            ids = head + self.encode(text)
            if add_eos:
                ids = ids[: context_length - 1] + [self.eos_id]
            ids = ids[:context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens, padding among them, left out unless asked)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"bos_id={self.bos_id}, pad_id={self.pad_id})")

    # a tokenizers.Tokenizer pickles itself as its JSON; spelled out so the wrapper's state stays explicit
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tok"] = self._tok.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_tok"] = RustTokenizer.from_str(state["_tok"])
        self.__dict__.update(state)


def _special_token_names(directory: Path) -> dict[str, str | None]:
    """eos/bos/pad token strings named by a directory's tokenizer_config.json or special_tokens_map.json."""
    names: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = directory / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} does not parse: {err}") from None
        for key in ("eos_token", "bos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names
