"""METALM: causality outside spans, bidirectional spans, packed span encoding, placement, KV-cache generation."""

from __future__ import annotations

import pytest
import torch

from mmpretrain.models.metalm import (
    IGNORE_INDEX,
    KVCache,
    MetaLM,
    create_metalm,
    gather_span_ids,
    list_metalm_models,
    semicausal_targets,
)

VOCAB = 37
TINY = dict(vocab_size=VOCAB, dim=32, layers=2, heads=4, max_seq_len=64, encoder_dim=24, encoder_layers=2,
            encoder_heads=3, eos_id=3, pad_id=2, bos_id=1)
TINY_VL = dict(vocab_size=VOCAB, dim=32, layers=2, heads=4, max_seq_len=64, encoder_layers=0, eos_id=3, pad_id=2,
               bos_id=1, image_encoder="clip", image_kwargs=dict(img_size=16, patch_size=8, embed_dim=24, depth=1,
                                                                 num_heads=2))


def tiny(**kwargs) -> MetaLM:
    torch.manual_seed(0)
    model = MetaLM(**{**TINY, **kwargs}).double().eval()
    # a trained-looking model: connector outputs as large as token embeddings, so spans matter in the checks
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


SPANS = torch.tensor([[0, 3, 5], [0, 12, 4], [1, 6, 7]])  # (row, start, length)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_logits_do_not_depend_on_later_tokens_outside_spans(positions):
    model = tiny(positions=positions)
    x = tokens()
    ref = model(x, SPANS)
    t = 9  # after row 0's first span, before its second
    for later in (10, 11, 13, 20):  # outside spans (10, 11, 20) and inside the later span [12, 16)
        y = x.clone()
        y[0, later] = (y[0, later] + 1) % VOCAB
        out = model(y, SPANS)
        torch.testing.assert_close(out[0, : t + 1], ref[0, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[0, later:], ref[0, later:])  # it does change what comes after it
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-12)  # rows are independent


def test_a_span_is_encoded_bidirectionally():
    """The first position of a span sees the span's last token (through the encoder); a causal model would not."""
    model = tiny()
    x = tokens()
    ref = model(x, SPANS)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % VOCAB  # the last token of the span [3, 8)
    out = model(y, SPANS)
    assert not torch.allclose(out[0, 3], ref[0, 3])  # the span's first position
    torch.testing.assert_close(out[0, :3], ref[0, :3], rtol=0, atol=1e-12)  # before the span: unchanged
    # and the encoder alone: the encoding of the span's first token depends on its last
    span = x[:1, 3:8]
    valid = torch.ones_like(span, dtype=torch.bool)
    changed = span.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert not torch.allclose(model.encoder(span, valid)[0, 0], model.encoder(changed, valid)[0, 0])


def test_packed_spans_with_padding_equal_each_span_encoded_alone():
    model = tiny()
    x = tokens()
    span_ids = gather_span_ids(x, SPANS, pad_id=0, width=8)  # padded past every span's end
    valid = torch.arange(8) < SPANS[:, 2:3]
    packed = model.encoder(span_ids, valid)
    for i, (row, start, length) in enumerate(SPANS.tolist()):
        alone = model.encoder(x[row : row + 1, start : start + length], torch.ones(1, length, dtype=torch.bool))
        torch.testing.assert_close(packed[i, :length], alone[0], rtol=0, atol=1e-12)
    # the padding value does not matter
    garbage = span_ids.masked_fill(~valid, 30)
    torch.testing.assert_close(model.encoder(garbage, valid)[valid], packed[valid], rtol=0, atol=1e-12)


def test_span_encodings_replace_the_token_embeddings_at_span_positions():
    model = tiny()
    x = tokens()
    emb = model.embed_tokens(x, SPANS)
    plain = model.embed(x)
    inside = torch.zeros(2, 24, dtype=torch.bool)
    for row, start, length in SPANS.tolist():
        inside[row, start : start + length] = True
        alone = model.connector(model.encoder(x[row : row + 1, start : start + length],
                                              torch.ones(1, length, dtype=torch.bool)))
        torch.testing.assert_close(emb[row, start : start + length], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(emb[~inside], plain[~inside], rtol=0, atol=0)
    # given span_ids of another width (the data pads to a multiple of 8) or none: the same
    for span_ids in (gather_span_ids(x, SPANS, width=16), None):
        torch.testing.assert_close(model.embed_tokens(x, SPANS, span_ids), emb, rtol=0, atol=1e-12)


def test_gradients_reach_the_encoder_and_are_zero_without_spans():
    model = tiny().train()
    x = tokens()
    targets = semicausal_targets(x, SPANS)
    logits = model(x, SPANS)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert model.encoder.embed.weight.grad.abs().sum() > 0 and model.connector.proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # no spans: the encoder still gets (zero) gradients, as DDP needs
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    assert model.embed.weight.grad.abs().sum() > 0


def test_targets_without_spans_stay_on_the_tokens_device():
    ids = tokens().to("meta")
    assert semicausal_targets(ids, None, torch.zeros_like(ids)).device.type == "meta"
    ids = tokens()
    targets = semicausal_targets(ids, None, torch.zeros_like(ids))
    assert torch.equal(targets[:, :-1], ids[:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        model = tiny().train()
        model.set_grad_checkpointing(enable)
        model(tokens(), SPANS).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.parametrize("variant", [{}, {"positions": "learned"}, {"mlp": "swiglu", "connector": "mlp"}],
                         ids=["rotary", "learned", "swiglu"])
def test_cached_generation_equals_full_recomputation(variant):
    model = tiny(**variant)
    prompt = tokens(t=12)
    spans = torch.tensor([[0, 2, 4], [1, 5, 6]])
    cached = model.generate(prompt, 15, spans=spans, eos_id=None)
    full = model.generate(prompt, 15, spans=spans, eos_id=None, use_cache=False)
    assert cached.shape == (2, 27) and torch.equal(cached[:, :12], prompt)
    assert torch.equal(cached, full)
    # the spans condition the continuation
    assert not torch.allclose(model(prompt, spans)[:, -1], model(prompt)[:, -1])
    # sampling: the same draws along both paths
    sample = [model.generate(prompt, 10, spans=spans, temperature=0.8, top_k=10, top_p=0.9, use_cache=c,
                             generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sample[0], sample[1])


def test_cache_steps_equal_the_full_forward():
    """Logits of a prompt read in two chunks through the cache equal the one-pass logits (offset causal mask)."""
    model = tiny()
    x = tokens(t=16)
    full = model(x, SPANS[:2])
    cache = KVCache(len(model.blocks), 16)
    first = model(x[:, :10], SPANS[:1], cache=cache)
    rest = model(x[:, 10:], cache=cache)  # the span [12, 16) of row 0 left out: compare before it only
    torch.testing.assert_close(first, full[:, :10], rtol=0, atol=1e-10)
    full_one_span = model(x, SPANS[:1])
    torch.testing.assert_close(rest, full_one_span[:, 10:], rtol=0, atol=1e-10)


def test_generation_stops_at_end_of_text_and_pads():
    model = tiny()
    prompt = tokens(t=6)
    free = model.generate(prompt, 12, eos_id=None)
    eos = int(free[0, 8])  # make row 0's third new token the end of text (or an earlier one, if repeated)
    stop = free[0, 6:].tolist().index(eos)
    out = model.generate(prompt, 12, eos_id=eos, pad_id=0)
    row = out[0, 6:].tolist()
    assert row[stop] == eos and all(t == 0 for t in row[stop + 1 :])
    assert out[0, : 7 + stop].tolist() == free[0, : 7 + stop].tolist()


def test_image_prefix_conditions_the_caption():
    torch.manual_seed(0)
    model = MetaLM(**TINY_VL).double().eval()
    assert model.num_image_tokens == 4 and model.image_size == (16, 16)
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = tokens(t=8)
    logits = model(x, image=image)
    assert logits.shape == (2, 8, VOCAB)  # text positions only
    other = model(x, image=torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert not torch.allclose(logits[:, 0], other[:, 0])
    # causal over the caption
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % VOCAB
    torch.testing.assert_close(model(y, image=image)[:, :5], logits[:, :5], rtol=0, atol=1e-12)
    prompt = torch.full((2, 1), 1)
    cached = model.generate(prompt, 10, image=image, eos_id=None)
    assert torch.equal(cached, model.generate(prompt, 10, image=image, eos_id=None, use_cache=False))


def test_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="no span encoder"):
        MetaLM(**{**TINY, "encoder_layers": 0})(tokens(), SPANS)
    with pytest.raises(ValueError, match="no image encoder"):
        tiny()(tokens(), image=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(positions="learned")(tokens(t=70))
    with pytest.raises(ValueError, match="eos_id 99 is outside"):
        MetaLM(**{**TINY, "eos_id": 99})
    with pytest.raises(ValueError, match="unknown METALM configuration"):
        create_metalm("metalm_7b")


def test_named_configurations_and_parameter_counts():
    assert list_metalm_models() == ["metalm_1p3b", "metalm_base", "metalm_demo", "metalm_vl_demo"]
    with torch.device("meta"):
        big = create_metalm("metalm_1p3b").parameter_counts()
        vl = create_metalm("metalm_vl_demo")
    # decoder 24 x 2048: 24 x (4 x 2048^2 attention + 2 x 4 x 2048^2 MLP + biases and norms) + tied embedding
    per_block = 12 * 2048**2 + 3 * 2048 + 2048 + 4 * 2048 + 2048 + 4 * 2048
    assert big["decoder"] == 24 * per_block + 50304 * 2048 + 2 * 2048 == 1_311_625_216
    assert big["encoder"] == 353_822_720 and big["connector"] == 1024 * 2048 + 2048
    assert big["total"] == 1_667_547_136
    assert vl.encoder is None and vl.image_encoder is not None and vl.num_image_tokens == 64
