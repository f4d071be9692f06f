"""CLIP towers and configurations: shapes, parameter counts, pooling, causality, checkpointing, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.models.clip import CLIP, clip_demo, create_clip, list_clip_models
from mmpretrain.models.losses import ClipLoss, SigLipLoss
from mmpretrain.models.text import TextTransformer


def tiny_text(**kwargs) -> TextTransformer:
    args = dict(vocab_size=50, context_length=12, width=32, heads=4, layers=2, output_dim=16, eot_id=3)
    return TextTransformer(**{**args, **kwargs})


def test_forward_shapes_and_outputs():
    torch.manual_seed(0)
    model = clip_demo(text_kwargs={"vocab_size": 100, "eot_id": 2})
    images, tokens = torch.randn(3, 3, 64, 64), torch.randint(0, 100, (3, 32))
    img, txt, scale, bias = model(images, tokens)
    assert img.shape == txt.shape == (3, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert bias is None
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_image(images, normalize=False).shape == (3, 128)
    # shorter token rows use the first positions
    assert model.encode_text(tokens[:, :10], normalize=False).shape == (3, 128)
    assert model.context_length == 32 and model.image_size == (64, 64)


def test_siglip_parametrisation_and_clamp():
    model = clip_demo(siglip=True)
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    *_, bias = model(torch.randn(2, 3, 64, 64), torch.randint(0, 4096, (2, 32)))
    assert bias is model.logit_bias
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale(max=2.0)
    assert model.logit_scale.item() == 0.0


@pytest.mark.parametrize(("name", "expected"), [("clip_vit_b32", 151.28e6), ("clip_vit_b16", 149.62e6)])
def test_parameter_counts_match_open_clip(name, expected):
    with torch.device("meta"):
        model = create_clip(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.005, f"{name}: {count / 1e6:.2f}M parameters"
    trunk = model.visual.trunk  # CLIP layout: ln_pre, class-token pooling, final norm with eps 1e-5
    assert isinstance(trunk.norm_pre, torch.nn.LayerNorm) and trunk.global_pool == "token"
    assert trunk.norm.eps == 1e-5 and trunk.patch_embed.proj.bias is None
    assert model.visual.proj.bias is None and model.text.proj.bias is None
    assert model.text.context_length == 77 and model.text.vocab_size == 49408


def test_registry_and_overrides():
    assert set(list_clip_models()) >= {"clip_vit_b32", "clip_vit_b16", "clip_demo"}
    with pytest.raises(ValueError, match="unknown CLIP configuration"):
        create_clip("clip_vit_h14")
    model = create_clip("clip_demo", embed_dim=64, text_kwargs={"vocab_size": 77})
    assert model.text.vocab_size == 77 and model.text.width == 128  # merged into the preset's dict
    assert model.text.output_dim == 64 and model.visual.proj.out_features == 64
    with pytest.raises(ValueError, match="not a timm model name"):
        CLIP(vision_model="no_such_vit")
    with pytest.raises(ValueError, match="never downloaded"):
        clip_demo(vision_kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="output_dim"):
        clip_demo(text_kwargs={"output_dim": 3})
    with pytest.raises(ValueError, match="context_length"):
        tiny_text()(torch.zeros(1, 13, dtype=torch.long))


def test_eot_pooling_picks_the_end_of_text_position():
    torch.manual_seed(0)
    text = tiny_text().eval()
    tokens = torch.tensor([
        [5, 6, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0],       # eot at 2
        [5, 6, 7, 8, 9, 10, 11, 3, 3, 0, 0, 0],     # first eot at 7
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],  # no eot: last position
    ])
    assert text.eot_positions(tokens).tolist() == [2, 7, 11]
    hidden = text.forward_features(tokens)
    expected = text.proj(hidden[torch.arange(3), torch.tensor([2, 7, 11])])
    torch.testing.assert_close(text(tokens), expected)
    # padding after the eot token cannot change the pooled features (causal attention)
    changed = tokens.clone()
    changed[0, 3:] = 40
    changed[1, 8:] = 41
    torch.testing.assert_close(text(changed)[:2], text(tokens)[:2])
    # a begin-of-text token (and padding) sharing the end-of-text id, as in GPT-2-style vocabularies
    assert text.eot_positions(torch.tensor([[3, 5, 6, 3, 3, 3], [3, 3, 3, 3, 3, 3]])).tolist() == [3, 1]
    assert text.eot_positions(torch.tensor([[3], [4]])).tolist() == [0, 0]
    # eot_id None: open_clip's argmax of the token ids
    argmax_text = tiny_text(eot_id=None)
    assert argmax_text.eot_positions(torch.tensor([[5, 49, 7, 0]])).tolist() == [1]


def test_text_attention_is_causal():
    torch.manual_seed(0)
    text = tiny_text().eval()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    a, b = text.forward_features(tokens), text.forward_features(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def _loss_and_grads(model, loss_fn, images, tokens):
    model.zero_grad()
    loss = loss_fn(*model(images, tokens))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("siglip", [False, True])
def test_grad_checkpointing_gives_the_same_loss_and_grads(siglip):
    torch.manual_seed(0)
    model = clip_demo(siglip=siglip, vision_kwargs={"depth": 2}, text_kwargs={"layers": 2, "vocab_size": 100})
    loss_fn = SigLipLoss() if siglip else ClipLoss()
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(0, 100, (4, 32))
    loss, grads = _loss_and_grads(model, loss_fn, images, tokens)
    model.set_grad_checkpointing(True)
    calls = []
    for block in (model.text.blocks[0], model.visual.trunk.blocks[0]):
        # a pre-hook: recomputation stops early, once it has what backward needs, so forward hooks may not run
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    loss_ckpt, grads_ckpt = _loss_and_grads(model, loss_fn, images, tokens)
    assert len(calls) == 4  # each tower's first block ran again in the backward pass
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_text_init_follows_open_clip():
    torch.manual_seed(0)
    text = TextTransformer(vocab_size=4000, context_length=77, width=256, heads=4, layers=8, output_dim=128)
    block = text.blocks[0]
    for tensor, std in [
        (text.token_embedding.weight, 0.02),
        (text.positional_embedding, 0.01),
        (block.attn.qkv.weight, 256**-0.5),
        (block.attn.out_proj.weight, 256**-0.5 * 16**-0.5),
        (block.mlp.fc.weight, 512**-0.5),
        (block.mlp.proj.weight, 256**-0.5 * 16**-0.5),
        (text.proj.weight, 256**-0.5),
    ]:
        assert tensor.std().item() == pytest.approx(std, rel=0.1)
    assert block.attn.qkv.bias.abs().sum() == 0


def test_bf16_autocast_forward():
    model = clip_demo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale, _ = model(torch.randn(2, 3, 64, 64), torch.randint(0, 4096, (2, 32)))
        loss = ClipLoss()(img, txt, scale)
    assert torch.isfinite(loss)
    assert F.normalize(img.float(), dim=-1).shape == (2, 128)


def test_logit_scale_is_a_one_element_vector_and_old_scalar_checkpoints_load():
    """One-element vectors (DeepSpeed's ZeRO bf16 paths cannot view 0-d parameters as bytes); a state dict that
    holds them as 0-d scalars, as checkpoints saved before did, loads into them."""
    model = clip_demo(siglip=True)
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["logit_scale"] = torch.tensor(1.5)
    state["logit_bias"] = torch.tensor(-3.0)
    model.load_state_dict(state)
    assert model.logit_scale.item() == 1.5 and model.logit_bias.item() == -3.0
