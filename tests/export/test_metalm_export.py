"""Exported METALM models load in transformers from their own remote code, where mmpretrain cannot be
imported, and give our logits, our loss and our greedy generations: text with non-causal spans, and
image-text."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mmpretrain.data.semicausal import ImageCaptionDataModule
from mmpretrain.data.text import TextDataModule
from mmpretrain.data.tokenizer import train_bpe
from mmpretrain.data.writer import ShardWriter
from mmpretrain.export import export_checkpoint, export_task, load_task, main, read_checkpoint
from mmpretrain.export.metalm import export_metalm, metalm_hf_state_dict
from mmpretrain.export.vit import UnsupportedArchitecture
from mmpretrain.models.metalm import IGNORE_INDEX, create_metalm, semicausal_targets
from mmpretrain.tasks.semicausal_lm import SemiCausalLM
from tests.conftest import write_image_shards

TINY = dict(dim=32, layers=2, heads=4, encoder_dim=24, encoder_layers=2, encoder_heads=3, max_seq_len=64)
TINY_VL = dict(dim=32, layers=2, heads=4, max_seq_len=64,
               image_kwargs=dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2))
MAX_NEW = 7  # the task's max_new_tokens, into generation_config.json

# runs in `python -I` from a directory outside the repository, with an import hook that refuses mmpretrain
# (it is installed in editable mode here, which -I alone would not hide); one process for every exported model
LOAD_ELSEWHERE = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoMMPretrain(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mmpretrain" or name.startswith("mmpretrain."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoMMPretrain())
    try:
        import mmpretrain  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("mmpretrain is importable in the checking process")

    import torch
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    for job in json.loads(sys.argv[1]):
        out_dir, inp = job["dir"], torch.load(job["inputs"])
        model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
        res = {"class": type(model).__name__, "config": model.config.to_dict(),
               "tied": model.lm_head.weight.data_ptr() == model.model.embed.weight.data_ptr()}
        ids, image = inp["ids"], inp.get("pixel_values")
        extra = {"pixel_values": image} if image is not None else {}
        greedy = dict(do_sample=False, max_new_tokens=inp["max_new_tokens"])
        with torch.no_grad():
            res["logits"] = model(input_ids=ids, **extra).logits
            if "spans" in inp:
                spans = inp["spans"]
                out = model(input_ids=ids, spans=spans, labels=ids)
                res["span_logits"], res["span_loss"] = out.logits, out.loss
                # spans follow their rows when transformers copies rows (beam search, num_return_sequences)
                big, kw = model._expand_inputs_for_generation(expand_size=2, input_ids=ids, spans=spans)
                res["expanded_logits"] = model(input_ids=big, **kw).logits
                res["generate_spans"] = model.generate(inp["prompt"], spans=inp["prompt_spans"], **greedy)
                res["generate_spans_nocache"] = model.generate(inp["prompt"], spans=inp["prompt_spans"],
                                                               use_cache=False, **greedy)
                res["sample_top1_spans"] = model.generate(
                    inp["prompt"], spans=inp["prompt_spans"], do_sample=True, top_k=1, num_return_sequences=2,
                    max_new_tokens=inp["max_new_tokens"])
            res["generate"] = model.generate(inp["prompt"], **extra, **greedy)
            res["generate_default"] = model.generate(inp["prompt"], **extra)  # generation_config.json's
            # left padding: each row gives what it gives alone
            if "padded" in inp:
                res["generate_padded"] = model.generate(inp["padded"], attention_mask=inp["padded_mask"],
                                                        **greedy)
        tok = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
        plain = AutoTokenizer.from_pretrained(out_dir)  # no flag: transformers declines the config's code
        fast = PreTrainedTokenizerFast.from_pretrained(out_dir)
        texts = ["a red circle", "two blue squares on the left"]
        batch = tok(texts, padding=True)
        res["tokenizer"] = {"class": type(tok).__name__, "ids": tok(texts[0])["input_ids"],
                            "plain_ids": plain(texts[0])["input_ids"],
                            "fast_ids": fast(texts[0])["input_ids"],
                            "batch_ids": batch["input_ids"], "batch_mask": batch["attention_mask"],
                            "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
                            "max_length": tok.model_max_length}
        if image is not None:
            processor = AutoImageProcessor.from_pretrained(out_dir)
            res["processor"] = {"class": type(processor).__name__, "size": processor.size,
                                "mean": list(processor.image_mean)}
        torch.save(res, job["result"])
    with open(sys.argv[2], "w") as f:  # not stdout: transformers prints a prompt there
        json.dump({"mmpretrain_loaded": any(m.split(".")[0] == "mmpretrain" for m in sys.modules)}, f)
""")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def documents(count: int, seed: str) -> list[str]:
    rng = random.Random(seed)
    starts = [rng.randint(0, 50) for _ in range(count)]
    return [" ".join(str(n) for n in range(s, s + rng.randint(10, 30))) for s in starts]


def write_docs(directory: Path, count: int, prefix: str) -> str:
    with ShardWriter(directory, prefix=prefix, shard_size=count, metadata={"kind": "text"}) as w:
        for i, text in enumerate(documents(count, prefix)):
            w.write({"__key__": f"{i:05d}", "txt": text})
    return str(directory / f"{prefix}-*.tar")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy machine threads waiting for each other
    cost 100 times the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE trained on the test's documents and captions (milliseconds, unlike the demo
    tokenizer)."""
    texts = documents(200, "tokenizer") + [f"sample {n}" for n in range(50)]
    texts += ["a red circle", "two blue squares"]
    return str(train_bpe(texts, 400, tmp_path_factory.mktemp("tokenizer"), min_frequency=1))


def fit(task: SemiCausalLM, data, root: Path, steps: int) -> Path:
    """A real checkpoint from Lightning's Trainer after a few optimizer steps (with the data module's
    hyperparameters)."""
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, accelerator="cpu",
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """Train a text model with spans and an image-text model, export both with ``mmpretrain export``, compute
    our outputs, and have a process without mmpretrain load the directories and compute theirs."""
    root = tmp_path_factory.mktemp("metalm_export")
    torch.manual_seed(0)
    # text with spans, documents starting with the beginning-of-text token
    text_data = TextDataModule(train_shards=write_docs(root, 40, "train"), tokenizer=tokenizer_dir,
                               seq_len=32, batch_size=4, num_workers=0, mode="epoch", add_bos=True,
                               spans={"min_len": 3, "max_len": 6, "coverage": 0.25})
    text_task = SemiCausalLM(preset="metalm_demo", overrides=TINY, vocab_size=text_data.vocab_size,
                             max_new_tokens=MAX_NEW, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    (root / "text").mkdir()
    text_ckpt = fit(text_task, text_data, root / "text", 3)
    # image-text
    urls = write_image_shards(root / "images", [16])
    vl_data = ImageCaptionDataModule(train_shards=urls, tokenizer=tokenizer_dir, context_length=8,
                                     image_size=16, batch_size=4, num_workers=0, mode="epoch",
                                     eval_transform={"crop_pct": 1.0})
    vl_task = SemiCausalLM(preset="metalm_vl_demo", overrides=TINY_VL, vocab_size=vl_data.vocab_size,
                           max_new_tokens=MAX_NEW, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    (root / "vl").mkdir()
    vl_ckpt = fit(vl_task, vl_data, root / "vl", 2)

    # the `mmpretrain export` command, and the function behind it
    assert main(["--checkpoint", str(text_ckpt), "--output", str(root / "hf_text")]) == 0
    export_checkpoint(vl_ckpt, root / "hf_vl")

    g = torch.Generator().manual_seed(1)
    tok = text_data.tokenizer
    cases = {}
    for name, ckpt in (("text", text_ckpt), ("vl", vl_ckpt)):
        model = load_task(read_checkpoint(ckpt)).model.eval()
        ids = torch.randint(3, model.vocab_size, (2, 20), generator=g)
        inputs = {"ids": ids, "max_new_tokens": 9}
        if name == "text":
            prompt = torch.cat([torch.full((2, 1), tok.bos_id), ids[:, :7]], dim=1)
            inputs.update(spans=torch.tensor([[0, 2, 5], [0, 11, 4], [1, 6, 6]]), prompt=prompt,
                          prompt_spans=torch.tensor([[0, 1, 3], [1, 3, 4]]))
            # a batch of two prompts, the second one token shorter and padded on the left
            short = prompt[1:, 1:]
            inputs["padded"] = torch.cat([prompt[:1], torch.cat([torch.full((1, 1), tok.pad_id), short], 1)])
            inputs["padded_mask"] = torch.ones_like(inputs["padded"])
            inputs["padded_mask"][1, 0] = 0
            inputs["short"] = short
        else:
            inputs.update(pixel_values=torch.randn(2, 3, 16, 16, generator=g),
                          prompt=torch.full((2, 1), tok.bos_id))
        torch.save(inputs, root / f"{name}_inputs.pt")
        cases[name] = {"model": model, "inputs": inputs, "dir": root / f"hf_{name}"}

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "load.py").write_text(LOAD_ELSEWHERE)
    jobs = [{"dir": str(c["dir"]), "inputs": str(root / f"{n}_inputs.pt"),
             "result": str(root / f"{n}_result.pt")} for n, c in cases.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "load.py", json.dumps(jobs), str(root / "modules.json")],
                          cwd=elsewhere, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((root / "modules.json").read_text()) == {"mmpretrain_loaded": False}
    for name, case in cases.items():
        case["theirs"] = torch.load(root / f"{name}_result.pt", weights_only=False)
    cases["tokenizer"] = tok
    return cases


def test_directory_holds_config_code_safetensors_tokenizer_and_generation_config(exported):
    for name in ("text", "vl"):
        out, model = exported[name]["dir"], exported[name]["model"]
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "configuration_mmpretrain_metalm.py",
                "modeling_mmpretrain_metalm.py"} <= names
        assert ("preprocessor_config.json" in names) == (name == "vl")
        assert not list(out.glob("*.bin"))
        for code in ("configuration_mmpretrain_metalm.py", "modeling_mmpretrain_metalm.py"):
            source = (out / code).read_text()
            assert not re.search(r"^\s*(from|import)\s+(mmpretrain|timm)", source, re.MULTILINE)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "mmpretrain_metalm"
        assert config["architectures"] == ["MetaLMForCausalLM"]
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mmpretrain_metalm.MetaLMForCausalLM"
        assert config["tie_word_embeddings"] is True
        tok = exported["tokenizer"]
        generation = json.loads((out / "generation_config.json").read_text())
        assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == \
            (tok.bos_id, tok.eos_id, tok.pad_id) == (model.bos_id, model.eos_id, model.pad_id)
        assert generation["max_new_tokens"] == MAX_NEW and not generation.get("do_sample", False)
        # the tied output projection is stored once
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert "model.embed.weight" in keys and "lm_head.weight" not in keys
        assert keys == set(metalm_hf_state_dict(model)) - {"lm_head.weight"}
        theirs = exported[name]["theirs"]
        assert theirs["class"] == "MetaLMForCausalLM" and theirs["tied"]
    assert exported["text"]["theirs"]["config"]["encoder_num_hidden_layers"] == 2
    assert exported["vl"]["theirs"]["config"]["image_encoder_config"]["image_size"] == [16, 16]


def test_text_logits_loss_and_spans_match_ours(exported):
    case = exported["text"]
    model, inp, theirs = case["model"], case["inputs"], case["theirs"]
    ids, spans = inp["ids"], inp["spans"]
    with torch.no_grad():
        plain, semi = model(ids), model(ids, spans)
    assert relative_error(plain, theirs["logits"]) < 1e-4
    assert relative_error(semi, theirs["span_logits"]) < 1e-4
    assert relative_error(semi, plain) > 1e-3  # the spans matter: the comparison is not of a plain causal LM
    # the loss skips span tokens (encoder inputs) as training does
    targets = semicausal_targets(ids, spans)
    ours = torch.nn.functional.cross_entropy(semi.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(theirs["span_loss"], ours, rtol=1e-4, atol=1e-5)
    # rows copied by generate's expansion keep their spans
    expanded = theirs["expanded_logits"]
    assert expanded.shape[0] == 4
    for row in range(2):
        for copy in range(2):
            assert relative_error(semi[row], expanded[2 * row + copy]) < 1e-4


def test_text_greedy_generation_equals_ours(exported):
    case = exported["text"]
    model, inp, theirs = case["model"], case["inputs"], case["theirs"]
    prompt, spans, n = inp["prompt"], inp["prompt_spans"], inp["max_new_tokens"]
    ours = model.generate(prompt, n, spans=spans)
    assert torch.equal(theirs["generate_spans"], ours)
    assert torch.equal(theirs["generate_spans_nocache"], ours)  # full recomputation with spans at every step
    assert torch.equal(theirs["sample_top1_spans"], ours.repeat_interleave(2, dim=0))
    assert torch.equal(theirs["generate"], model.generate(prompt, n))
    assert torch.equal(theirs["generate_default"], model.generate(prompt, MAX_NEW))
    # a left-padded batch: each row continues as it does alone (rows that stop early are filled with padding)
    padded, pad = theirs["generate_padded"], exported["tokenizer"].pad_id
    short = model.generate(inp["short"], n)[0]
    full = model.generate(inp["padded"][:1], n)[0]
    assert padded[1, 1:].tolist() == short.tolist() + [pad] * (padded.shape[1] - 1 - len(short))
    assert padded[0].tolist() == full.tolist() + [pad] * (padded.shape[1] - len(full))


def test_image_text_logits_and_captions_equal_ours(exported):
    case = exported["vl"]
    model, inp, theirs = case["model"], case["inputs"], case["theirs"]
    image = inp["pixel_values"]
    with torch.no_grad():
        logits = model(inp["ids"], image=image)
    assert theirs["logits"].shape == logits.shape == (2, 20, model.vocab_size)  # text positions only
    assert relative_error(logits, theirs["logits"]) < 1e-4
    n = inp["max_new_tokens"]
    assert torch.equal(theirs["generate"], model.generate(inp["prompt"], n, image=image))
    assert torch.equal(theirs["generate_default"], model.generate(inp["prompt"], MAX_NEW, image=image))
    assert theirs["processor"]["class"] == "ConvNextImageProcessor" and theirs["processor"]["size"] == {
        "shortest_edge": 16}


def test_tokenizer_loads_and_gives_the_training_ids(exported):
    tok = exported["tokenizer"]
    ids = tok.encode("a red circle")
    # the text data adds the beginning-of-text token (add_bos); captions always do
    for name in ("text", "vl"):
        t = exported[name]["theirs"]["tokenizer"]
        assert t["ids"] == t["plain_ids"] == t["fast_ids"] == [tok.bos_id, *ids]
        assert t["special"] == [tok.bos_id, tok.eos_id, tok.pad_id]
        # the shorter text is padded on the left, for generate()
        assert t["batch_mask"][0][0] == 0 and t["batch_mask"][0][-1] == 1 and t["batch_mask"][1][0] == 1
        assert t["batch_ids"][0][0] == tok.pad_id
    assert exported["text"]["theirs"]["tokenizer"]["max_length"] == 32  # the training sequence length
    assert exported["vl"]["theirs"]["tokenizer"]["max_length"] == 8  # the caption length


# ---------------------------------------------------------------------------------------- no subprocess below


def test_every_variant_round_trips_in_process(tmp_path, tokenizer_dir):
    """Learned positions, SwiGLU, no biases, an MLP connector; a ViT with register tokens, layer scale, no
    class token in its position embedding and QuickGELU: the exported classes (imported here) give our
    logits."""
    from mmpretrain.export.hf_metalm import MetaLMForCausalLM

    variants = {
        "learned": dict(positions="learned", mlp="swiglu", bias=False, connector="mlp", **TINY),
        "vit": dict(**{**TINY_VL, "image_kwargs": dict(img_size=16, patch_size=8, embed_dim=24, depth=1,
                                                       num_heads=2, reg_tokens=2, no_embed_class=True,
                                                       init_values=0.5, act_layer="quick_gelu")},
                    image_connector="mlp", encoder_layers=1, encoder_dim=16, encoder_heads=2),
    }
    g = torch.Generator().manual_seed(0)
    for name, kwargs in variants.items():
        preset = "metalm_vl_demo" if "image_kwargs" in kwargs else "metalm_demo"
        torch.manual_seed(0)
        model = create_metalm(preset, vocab_size=400, **kwargs).eval()
        with torch.no_grad():  # a trained-looking model: spans and layer scales matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out = export_metalm(model, tmp_path / name, {"tokenizer": tokenizer_dir})
        hf = MetaLMForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(3, 400, (2, 12), generator=g)
        spans = torch.tensor([[0, 1, 4], [1, 6, 3]])
        image = torch.randn(2, 3, 16, 16, generator=g) if preset == "metalm_vl_demo" else None
        with torch.no_grad():
            ours = model(ids, spans, image=image)
            theirs = hf(input_ids=ids, spans=spans, pixel_values=image).logits
        assert relative_error(ours, theirs) < 1e-4, name
        prompt = ids[:, :5]
        assert torch.equal(hf.generate(prompt, max_new_tokens=6, do_sample=False, pixel_values=image,
                                       spans=spans[:1]),
                           model.generate(prompt, 6, image=image, spans=spans[:1], eos_id=0, pad_id=2))


def test_what_does_not_export_fails_naming_it(tmp_path, tokenizer_dir):
    overrides = {**TINY_VL, "image_kwargs": {**TINY_VL["image_kwargs"], "qk_norm": True}}
    qk_norm = SemiCausalLM(preset="metalm_vl_demo", vocab_size=400, overrides=overrides)
    qk_norm.configure_model()
    with pytest.raises(UnsupportedArchitecture, match="normalises inside attention"):
        export_task(qk_norm, tmp_path / "qk", {"tokenizer": tokenizer_dir})
    task = SemiCausalLM(preset="metalm_demo", vocab_size=400, overrides=TINY)
    task.configure_model()
    with pytest.raises(ValueError, match="EMA"):
        export_task(task, tmp_path / "ema", {"tokenizer": tokenizer_dir}, ema=True)
    with pytest.raises(ValueError, match="no tokenizer"):
        export_task(task, tmp_path / "none", {})
    task.model.eos_id = 5
    with pytest.raises(ValueError, match="eos_id is 5"):
        export_task(task, tmp_path / "ids", {"tokenizer": tokenizer_dir})
