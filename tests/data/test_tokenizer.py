"""The byte-level BPE tokenizer: training, loading (ours and transformers'), fixed-length batches, the CLI tool."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from data_tools import train_tokenizer
from mmpretrain.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer, train_bpe
from mmpretrain.data.writer import ShardWriter

CORPUS = [
    f"a {size} {color} {shape} in the {pos} corner, number {i}."
    for i, (size, color, shape, pos) in enumerate(
        (s, c, h, p)
        for s in ("small", "large")
        for c in ("red", "green", "blue")
        for h in ("star", "ring", "circle", "square")
        for p in ("top left", "bottom right")
    )
] * 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe(CORPUS, 320, tmp_path_factory.mktemp("tok") / "tok")


def test_trained_directory_loads_in_transformers(tok_dir: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    ours = Tokenizer.from_dir(tok_dir)
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = loader.from_pretrained(str(tok_dir), local_files_only=True)
        assert (hf.eos_token, hf.bos_token, hf.pad_token) == (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (ours.eos_id, ours.bos_id, ours.pad_id)
        assert len(hf) == ours.vocab_size
        text = "a large blue star in the top left corner"
        assert hf(text)["input_ids"] == ours.encode(text)  # no special tokens added behind anyone's back
        assert hf.decode(ours.encode(text)) == text


def test_special_tokens_and_vocabulary(tok_dir: Path):
    tok = Tokenizer.from_dir(tok_dir)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 2)
    assert len({tok.eos_id, tok.bos_id, tok.pad_id}) == 3
    assert 259 < tok.vocab_size <= 320 and len(tok) == tok.vocab_size
    assert len(tok.encode("a large blue star")) < len("a large blue star")  # merges learnt from the corpus


def test_training_is_deterministic(tmp_path: Path, tok_dir: Path):
    again = train_bpe(list(CORPUS), 320, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name


@pytest.mark.parametrize("text", ["a small red ring", "  spaces,\ttabs\nand newlines  ", "émoji 🎉 ünïcode 漢字", ""])
def test_round_trip(tok_dir: Path, text: str):
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_pads_and_truncates_keeping_eos(tok_dir: Path):
    tok = Tokenizer.from_dir(tok_dir)
    short, long = "a red star", " ".join(["a large green circle in the bottom right corner"] * 10)
    ids = tok.encode_batch([short, long], context_length=12)
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    n = len(tok.encode(short))
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(short), tok.eos_id] + [tok.pad_id] * (12 - n - 2)
    assert ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id and ids[1, 1:-1].tolist() == tok.encode(long)[:10]
    assert tok.decode(ids[0]) == short  # padding and markers are special: left out of the text

    bare = tok.encode_batch([short, long], context_length=5, add_bos=False, add_eos=False)
    assert bare[1].tolist() == tok.encode(long)[:5]
    assert bare[0].tolist()[:n] == tok.encode(short) and set(bare[0].tolist()[n:]) <= {tok.pad_id}
    assert tok.encode_batch([], 4).shape == (0, 4)


def test_pickles_for_dataloader_workers(tok_dir: Path):
    tok = Tokenizer.from_dir(tok_dir)
    clone = pickle.loads(pickle.dumps(tok))
    text = "a small blue square in the top left corner, number 7."
    assert clone.encode(text) == tok.encode(text)
    assert (clone.vocab_size, clone.eos_id, clone.bos_id, clone.pad_id) == (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id)
    assert torch.equal(clone.encode_batch([text], 16), tok.encode_batch([text], 16))


def test_missing_or_empty_directory_is_named(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        Tokenizer.from_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*holds no tokenizer.*tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "empty")


def test_other_directories_load(tmp_path: Path, tok_dir: Path):
    from tokenizers import Tokenizer as RustTokenizer

    text = "a large red ring"
    ours = Tokenizer.from_dir(tok_dir)
    # the tokenizer.json file itself
    assert Tokenizer.from_dir(tok_dir / "tokenizer.json").encode(text) == ours.encode(text)
    # a bare tokenizer.json without configuration: special tokens found by their usual names
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_dir(bare).eos_id == ours.eos_id
    # a transformers directory with a slow GPT-2 tokenizer only (vocab.json + merges.txt): converted
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    RustTokenizer.from_file(str(tok_dir / "tokenizer.json")).model.save(str(gpt2))
    (gpt2 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}))
    converted = Tokenizer.from_dir(gpt2)
    assert converted.encode(text) == ours.encode(text)
    assert converted.eos_id == converted.bos_id == ours.eos_id


def test_eos_naming_a_missing_token_is_an_error(tmp_path: Path, tok_dir: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nothing>"}))
    with pytest.raises(ValueError, match="broken.*eos_token '</nothing>' is not in the vocabulary"):
        Tokenizer.from_dir(broken)


# -- the command-line tool ------------------------------------------------------------------------------------
def write_caption_shards(directory: Path) -> str:
    with ShardWriter(directory, prefix="train", shard_size=20, metadata={"kind": "image-text"}) as w:
        for i, text in enumerate(CORPUS):
            w.write({"__key__": f"{i:05d}", "txt": text, "json": {"caption": text.upper(), "n": i}})
    return str(directory / "train-{000000..000007}.tar")


def test_train_tokenizer_tool_reads_shards(tmp_path: Path, capsys):
    pattern = write_caption_shards(tmp_path / "shards")
    lower, upper = "a small red star in the corner", "A SMALL RED STAR IN THE CORNER"
    for key, learnt, unseen in (("txt", lower, upper), ("json:caption", upper, lower)):
        out = tmp_path / f"tok-{key.replace(':', '_')}"
        assert train_tokenizer.main(["--shards", pattern, "--key", key, "--vocab-size", "300", "--output", str(out)]) == 0
        assert f"on {len(CORPUS)} texts" in capsys.readouterr().out
        tok = Tokenizer.from_dir(out)
        assert tok.vocab_size == 300
        assert len(tok.encode(learnt)) < len(tok.encode(unseen)) == len(unseen)  # learnt on the field it was given


def test_train_tokenizer_tool_reads_files(tmp_path: Path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:40]) + "\n\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for text in CORPUS[40:]:
            f.write(json.dumps({"meta": {"body": text}}) + "\n")
    out = tmp_path / "tok"
    args = ["--files", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--jsonl-field", "meta.body",
            "--vocab-size", "300", "--output", str(out)]
    assert train_tokenizer.main(args) == 0
    assert f"on {len(CORPUS)} texts" in capsys.readouterr().out
    assert train_tokenizer.main([*args, "--max-texts", "10"]) == 0
    assert "on 10 texts" in capsys.readouterr().out


def test_train_tokenizer_tool_errors(tmp_path: Path, capsys):
    pattern = write_caption_shards(tmp_path / "shards")
    assert train_tokenizer.main(["--shards", str(tmp_path / "none-{0..3}.tar"), "--output", str(tmp_path / "t")]) == 2
    assert "none-0.tar" in capsys.readouterr().err
    assert train_tokenizer.main(["--shards", pattern, "--key", "json:missing", "--output", str(tmp_path / "t")]) == 1
    assert "no text found under key 'json:missing'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # nothing written when there is nothing to learn from
    assert train_tokenizer.main(["--files", str(tmp_path / "absent.txt"), "--output", str(tmp_path / "t")]) == 2
    with pytest.raises(SystemExit) as exit_:
        train_tokenizer.main(["--help"])
    assert exit_.value.code == 0 and "--vocab-size" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--output", str(tmp_path / "t")])  # no input given
