"""Exported Vision Mamba classifiers load in transformers from their own remote code, where mmpretrain cannot be
imported, and give our logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch

import mmpretrain.models  # noqa: F401  (registers the vim_* names with timm, which the checkpoint's task needs)
from mmpretrain.export import export_task, load_task, main, read_checkpoint
from mmpretrain.export.vit import UnsupportedArchitecture
from mmpretrain.tasks.classification import ImageClassification

CLASSES = ["circle", "square", "star"]
TINY = {
    # overlapping patches (stride < patch) and a class token in the middle: what a plain ViT would get wrong
    "mamba": {"img_size": 32, "patch_size": 8, "stride": 6, "embed_dim": 32, "depth": 2, "d_state": 4},
    "lru": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "mixer": "lru",
            "mixer_kwargs": {"d_state": 12, "expand": 2}},
    # non-overlapping patches (one matrix product in both models) over a size the patch does not divide: the last
    # 4 rows and columns fall outside every patch, as with a strided convolution
    "mamba_crop": {"img_size": 36, "patch_size": 8, "embed_dim": 32, "depth": 2, "d_state": 4},
}

# runs in `python -I` from a directory outside the repository, with an import hook that refuses mmpretrain
# (it is installed in editable mode here, which -I alone would not hide)
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
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out_dir, inputs, result = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(out_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(out_dir)
    with torch.no_grad():
        logits = model(pixel_values=torch.load(inputs)).logits
    torch.save(logits, result)
    print(json.dumps({"class": type(model).__name__, "id2label": model.config.id2label,
                      "processor": type(processor).__name__, "shortest_edge": processor.size["shortest_edge"],
                      "mmpretrain_loaded": any(m.split(".")[0] == "mmpretrain" for m in sys.modules)}))
""")


def trained_checkpoint(tmp_path, backbone_kwargs, **task_kwargs) -> str:
    """A real checkpoint from Lightning's Trainer after two optimizer steps."""
    task = ImageClassification(backbone="vim_tiny", backbone_kwargs=backbone_kwargs, num_classes=3,
                               class_names=CLASSES, **task_kwargs)
    g = torch.Generator().manual_seed(0)
    size = backbone_kwargs["img_size"]
    batches = [{"image": torch.randn(4, 3, size, size, generator=g), "label": torch.tensor([0, 1, 2, 1])}] * 2
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.mark.parametrize("mixer", list(TINY))
def test_export_loads_without_mmpretrain_and_gives_our_logits(tmp_path, mixer):
    ckpt = trained_checkpoint(tmp_path, TINY[mixer])
    size = TINY[mixer]["img_size"]
    out = tmp_path / "hf"
    assert main(["--checkpoint", ckpt, "--output", str(out)]) == 0  # the `mmpretrain export` command
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json",
                                                "configuration_mmpretrain_vim.py", "modeling_mmpretrain_vim.py"}
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mmpretrain_vim" and config["mixer"] == TINY[mixer].get("mixer", "mamba")
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_mmpretrain_vim.VimForImageClassification"
    for name in ("configuration_mmpretrain_vim.py", "modeling_mmpretrain_vim.py"):
        assert not re.search(r"^\s*(from|import)\s+mmpretrain", (out / name).read_text(), re.MULTILINE)

    ours = load_task(read_checkpoint(ckpt)).model.eval()
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "load.py").write_text(LOAD_ELSEWHERE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-I", "load.py", str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["class"] == "VimForImageClassification" and not info["mmpretrain_loaded"]
    assert info["id2label"] == {str(i): n for i, n in enumerate(CLASSES)}
    assert info["processor"] == "ConvNextImageProcessor" and info["shortest_edge"] == size

    with torch.no_grad():
        expected = ours(x)
    got = torch.load(tmp_path / "y.pt")
    assert (got - expected).norm() / expected.norm() < 1e-4


def test_export_ema_weights_and_unsupported_models(tmp_path):
    from mmpretrain.export.hf_vim import VimForImageClassification

    ckpt = trained_checkpoint(tmp_path, TINY["mamba"], ema_decay=0.5)
    task = load_task(read_checkpoint(ckpt))
    ema = VimForImageClassification.from_pretrained(export_task(task, tmp_path / "ema", ema=True))
    raw = VimForImageClassification.from_pretrained(export_task(task, tmp_path / "raw"))
    assert torch.equal(ema.classifier.weight, task.ema.module.head.weight)
    assert not torch.equal(ema.classifier.weight, raw.classifier.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(raw.eval()(pixel_values=x).logits, task.model(x), rtol=1e-4, atol=1e-5)

    wide = ImageClassification(backbone="vim_tiny", backbone_kwargs={**TINY["mamba"], "img_size": (32, 48)},
                               num_classes=3)
    wide.configure_model()
    with pytest.raises(UnsupportedArchitecture, match="square"):
        export_task(wide, tmp_path / "wide")
