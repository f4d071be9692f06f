"""Vision Mamba classifier: shapes, the middle class token, bidirectionality, backends, initialisation,
checkpointing, weight decay, strides, timm's registry and data config, and training through our task."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F

import mmpretrain.models.vim  # noqa: F401  (registers the vim_* names with timm)
from mmpretrain.models.vim import Vim
from mmpretrain.tasks.classification import ImageClassification

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=4)


def tiny_vim(seed: int = 0, **kwargs) -> Vim:
    torch.manual_seed(seed)
    return Vim(**{**TINY, "num_classes": 5, "backend": "torch", **kwargs})


def test_forward_backward_shapes():
    m = tiny_vim()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    assert m.forward_features(x).shape == (3, 16 + 1, 32)
    logits = m(x)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (3, 32)


def test_class_token_is_inserted_and_read_in_the_middle():
    m = tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    assert m.cls_index == 8  # 16 patches: Vim puts the class token at M // 2
    tokens = m.embed(x)
    patches = m.patch_embed(x) + m.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 8], (m.cls_token + m.pos_embed[:, :1])[:, 0].expand(2, -1))
    torch.testing.assert_close(tokens[:, :8], patches[:, :8])
    torch.testing.assert_close(tokens[:, 9:], patches[:, 8:])
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 8])
    torch.testing.assert_close(m(x), m.head(feats[:, 8]))


def test_output_depends_on_tokens_on_both_sides():
    m = tiny_vim(depth=1)
    h = torch.randn(1, 17, 32, dtype=torch.float32, requires_grad=True)
    out = m.layers[0](h)
    for i in (3, 8, 12):
        grad = torch.autograd.grad(out[0, i].sum(), h, retain_graph=True)[0][0].abs().sum(-1)
        assert (grad[i + 1:] > 0).all(), f"position {i} does not see the tokens after it"
        assert (grad[:i] > 0).all(), f"position {i} does not see the tokens before it"


def test_torch_and_reference_scan_backends_give_the_same_model_output():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a = tiny_vim(backend="torch").double()
    b = tiny_vim(backend="reference").double()
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)


def test_initialisation():
    m = tiny_vim(depth=4, embed_dim=64, d_state=8)
    for layer in m.layers:
        mixer = layer.mixer
        for A_log in (mixer.A_log, mixer.A_b_log):
            torch.testing.assert_close(-torch.exp(A_log[0]).detach(), -torch.arange(1.0, 9.0))
        for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
            dt = F.softplus(dt_proj.bias.detach())
            assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert torch.equal(mixer.D.detach(), torch.ones(128)) and torch.equal(mixer.D_b.detach(), torch.ones(128))
        # out_proj: PyTorch's default bound 1/sqrt(fan_in), scaled by 1/sqrt(depth)
        bound = 1 / math.sqrt(128) / math.sqrt(4)
        w = mixer.out_proj.weight.abs().max().item()
        assert 0.8 * bound < w <= bound
        assert torch.equal(layer.norm.weight.detach(), torch.ones(64))
    for p in (m.pos_embed, m.cls_token, m.head.weight):
        assert 0.015 < p.std().item() < 0.025  # timm's trunc_normal_(std=0.02), as Vim
    assert torch.equal(m.head.bias.detach(), torch.zeros(5))


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        m = tiny_vim(drop_path_rate=0.2)
        m.set_grad_checkpointing(ckpt)
        m.train()
        torch.manual_seed(5)  # the same drop-path draws: checkpoint replays the RNG in the recomputation
        m(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_vim_matches_eager(device):
    """torch.compile(fullgraph=True) traces the whole model, with per-block checkpointing, in one graph: on the GPU
    the triton scan and convolution as custom ops under Inductor (bf16 autocast), on CPU the chunked torch scan
    (aot_eager). Logits and gradients equal eager's (within bf16 rounding on the GPU)."""
    m = tiny_vim(backend="auto").to(device)
    m.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32, device=device)

    def run(model):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).float()
        logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return {"logits": logits.detach(), **grads}

    eager = run(m)
    torch._dynamo.reset()
    compiled = run(torch.compile(m, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True))
    tol = 3e-2 if device == "cuda" else 1e-5
    for name, exp in eager.items():
        err = (compiled[name] - exp).norm() / exp.norm().clamp_min(1e-12)
        assert err < tol, f"{device}: {name} relative error {err:.2e}"


def test_no_weight_decay_and_parameter_groups():
    m = tiny_vim()
    names = m.no_weight_decay()
    assert {"pos_embed", "cls_token"} <= names
    for i in range(2):
        assert {f"layers.{i}.mixer.{n}" for n in ("A_log", "A_b_log", "D", "D_b")} <= names
    assert names <= {n for n, _ in m.named_parameters()}
    task = ImageClassification(backbone="vim_tiny", backbone_kwargs=TINY, num_classes=5)
    task.configure_model()
    decayed = {id(p) for p in task.parameter_groups()[0]["params"]}
    params = dict(task.model.named_parameters())
    assert id(params["layers.1.mixer.A_log"]) not in decayed and id(params["layers.0.mixer.A_b_log"]) not in decayed
    assert id(params["layers.1.mixer.in_proj.weight"]) in decayed


def test_layer_decay_groups_follow_the_blocks():
    task = ImageClassification(backbone="vim_tiny", backbone_kwargs=TINY, num_classes=5, layer_decay=0.5)
    task.configure_model()
    scales = {}
    for group in task.parameter_groups():
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    params = dict(task.model.named_parameters())
    # stem (0), layers.0 (1), layers.1 (2), norm_f and head (3): lr_scale = 0.5 ** (3 - layer)
    assert scales[id(params["pos_embed"])] == 0.125
    assert scales[id(params["layers.0.mixer.in_proj.weight"])] == 0.25
    assert scales[id(params["layers.1.mixer.A_log"])] == 0.5
    assert scales[id(params["head.weight"])] == 1.0


def test_stride_changes_the_token_count():
    m = tiny_vim(stride=4)
    assert m.patch_embed.grid_size == (7, 7) and m.cls_index == 24
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 50, 32)
    with torch.device("meta"):
        a = timm.create_model("vim_tiny")
        b = timm.create_model("vim_tiny", stride=8)
    assert a.pos_embed.shape[1] == 14 * 14 + 1 and b.pos_embed.shape[1] == 27 * 27 + 1


@pytest.mark.parametrize("img_size,stride", [(32, None), ((40, 35), None), (32, 4)])
def test_patch_embedding_matches_its_convolution(img_size, stride):
    """Non-overlapping patches go through one matrix product (overlapping ones through the convolution): the
    same tokens and weight gradients as the convolution, with the edge a strided convolution leaves out."""
    from mmpretrain.models.vim import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(img_size, 8, stride, 3, 16).double()
    x = torch.randn(2, 3, *pe.img_size, dtype=torch.float64)
    out = pe(x)
    ref = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [pe.proj.weight, pe.proj.bias], g)
    ref_grads = torch.autograd.grad(ref, [pe.proj.weight, pe.proj.bias], g)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_wrong_image_size_is_named():
    with pytest.raises(ValueError, match="img_size"):
        tiny_vim()(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="unknown mixer"):
        Vim(**TINY, mixer="attention")


@pytest.mark.parametrize("name,params", [("vim_tiny", 7_148_008), ("vim_small", 25_796_584), ("vim_base", 97_598_440)])
def test_registered_configs_and_parameter_counts(name, params):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == params  # the paper: 7M / 26M / 98M
    cfg = timm.data.resolve_data_config(model=m)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"


def test_data_config_follows_the_built_size():
    m = timm.create_model("vim_tiny", **TINY, num_classes=3)
    assert timm.data.resolve_data_config(model=m)["input_size"] == (3, 32, 32)
    m.reset_classifier(7)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    m.reset_classifier(0, global_pool="avg")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def fit(task: ImageClassification, steps: int, tmp_path, batch=None):
    g = torch.Generator().manual_seed(0)
    batch = batch or {"image": torch.randn(8, 3, 32, 32, generator=g), "label": torch.arange(8) % 4}
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return trainer, batch


def test_classification_task_trains_a_tiny_vim(tmp_path):
    def optimizer(params):
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)

    task = ImageClassification(backbone="vim_tiny", backbone_kwargs={**TINY, "drop_path_rate": 0.1},
                               num_classes=4, ema_decay=0.9, grad_checkpointing=True, optimizer=optimizer)
    task.configure_model()
    assert task.model.grad_checkpointing
    batch = {"image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             "label": torch.arange(8) % 4}
    task.model.eval()
    with torch.no_grad():
        before = F.cross_entropy(task.model(batch["image"]), batch["label"]).item()
    fit(task, 8, tmp_path, batch)
    task.model.eval()
    with torch.no_grad():
        after = F.cross_entropy(task.model(batch["image"]), batch["label"]).item()
    assert after < 0.7 * before, (before, after)  # measured: 1.40 -> 0.64
    assert task.flops_per_batch and task.flops_per_batch > 0  # counted on the meta device


def test_init_from_a_checkpoint_at_another_stride(tmp_path):
    """The stride-8 fine-tune path: init_from a Vim checkpoint, position embedding resampled, head new."""
    task = ImageClassification(backbone="vim_tiny", backbone_kwargs=TINY, num_classes=4)
    trainer, _ = fit(task, 1, tmp_path)
    ckpt = tmp_path / "pt.ckpt"
    trainer.save_checkpoint(ckpt)
    ft = ImageClassification(backbone="vim_tiny", backbone_kwargs={**TINY, "stride": 4}, num_classes=10,
                             init_from=str(ckpt))
    ft.configure_model()
    src, dst = task.model.state_dict(), ft.model.state_dict()
    assert dst["pos_embed"].shape == (1, 50, 32)
    torch.testing.assert_close(dst["pos_embed"][:, 0], src["pos_embed"][:, 0])  # the class entry is kept
    grid = dst["pos_embed"][0, 1:].reshape(7, 7, 32)
    # resampled, not new: the 7x7 grid's corners are close to the 4x4 grid's corners
    old = src["pos_embed"][0, 1:].reshape(4, 4, 32)
    assert (grid[0, 0] - old[0, 0]).norm() < (grid[0, 0] - old[3, 3]).norm()
    torch.testing.assert_close(dst["layers.1.mixer.A_log"], src["layers.1.mixer.A_log"])
    torch.testing.assert_close(dst["patch_embed.proj.weight"], src["patch_embed.proj.weight"])
    assert dst["head.weight"].shape == (10, 32)


def test_lru_mixer_variant():
    m = tiny_vim(mixer="lru", mixer_kwargs={"d_state": 8})
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert {"layers.1.mixer.lru_fwd.nu_log", "layers.0.mixer.lru_bwd.theta_log"} <= m.no_weight_decay()
    with torch.device("meta"):
        lru = timm.create_model("vim_lru_tiny", mixer_kwargs={"r_min": 0.5})
    assert lru.layers[0].mixer.d_state == 112 and lru.layers[0].mixer.lru_fwd.r_min == 0.5
    assert sum(p.numel() for p in lru.parameters()) == 7_191_784  # matched to Vim-Ti's 7,148,008


def test_official_vim_layout_converts():
    """hustvl/Vim adds its position embedding after inserting the class token; ours is stored class-first."""
    from mmpretrain.models.vim import convert_official_vim

    m = tiny_vim()
    i = m.cls_index
    official_pos = torch.randn(1, 17, 32)
    official = {**m.state_dict(), "pos_embed": official_pos}
    m.load_state_dict(convert_official_vim({"model": official}))
    x = torch.randn(2, 3, 32, 32)
    patches = m.patch_embed(x)
    tokens = torch.cat([patches[:, :i], m.cls_token.expand(2, -1, -1), patches[:, i:]], dim=1) + official_pos
    torch.testing.assert_close(m.embed(x), tokens)


def test_meta_device_counts_the_same_flops_as_a_real_run():
    """On meta tensors the mixer skips its scan (no values there; FlopCounterMode counts no elementwise work):
    the matrix products of forward and backward are counted exactly as in a real run (on the reference scan,
    which has none of its own; the torch backend's einsums are scan work the stand-in leaves out)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(device: str) -> int:
        with torch.device(device):
            torch.manual_seed(0)
            m = Vim(**{**TINY, "num_classes": 5, "backend": "reference"})
            x = torch.randn(2, 3, 32, 32)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(m(x), torch.tensor([1, 2], device=device)).backward()
        return counter.get_total_flops()

    real = count("cpu")
    assert real > 0 and count("meta") == real
    with torch.device("meta"):
        out = timm.create_model("vim_tiny", img_size=1248)(torch.empty(1, 3, 1248, 1248))  # seconds, not minutes
    assert out.shape == (1, 1000)
