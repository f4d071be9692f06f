"""METALM: a causal language model whose input, on random spans, comes from a bidirectional encoder.

Semi-causal language modeling (Hao et al., 2022, "Language Models are General-Purpose Interfaces")
--------------------------------------------------------------------------------------------------
A causal decoder reads a packed sequence of ``T`` tokens left to right. Some non-overlapping spans of it
are read by a bidirectional *encoder* instead: each span is encoded on its own, with full attention
inside it and none across spans, projected by a *connector* to the decoder's width, and written into the
decoder's input embeddings at the span's positions (in place of the token embeddings; no cross-attention).
The decoder is causal everywhere, over token embeddings and span encodings alike.

The loss (:func:`semicausal_targets`) is next-token prediction on the tokens **outside** spans:

- position ``t`` predicts token ``t + 1`` when token ``t + 1`` is not a span token and not padding
  (``doc_ids`` -1), for ``t = 0 .. T-2``;
- so the first token after a span is a target, predicted from the span's last position (whose input is
  the encoding of the whole span);
- **the subtle point: a token that is an encoder input is never a decoder target.** The position just
  before a span does not predict the span's first token, nor does any span position predict the next
  span token: the encoder sees the whole span bidirectionally, so its output at the span's last position
  already holds every span token, and a target among them would be copied rather than predicted (the
  decoder could read span token ``i + 1`` from the encodings it attends to at positions ``<= i``).
- Padding is never a target; the first token of a sequence has no predecessor and is none either.

The span sampler (:mod:`mmpretrain.data.spans`) never lets spans touch, so the token after every span is
a target whenever it is in the sequence and not padding. The decoder's attention crosses document
boundaries of a packed sequence, as GPT-style packed training does; ``doc_ids`` only confine spans and
mark padding.

Image-text: an image encoder (a timm ViT; ``image_encoder="clip"`` is timm's ``VisionTransformer`` in
open_clip's layout, whose weights an mmpretrain CLIP checkpoint's image tower provides) turns the image
into patch tokens (the class token dropped), a connector projects them, and they form one non-causal span
at the start of the decoder's input, before the caption's tokens. Logits come for the text positions only
(the image positions predict nothing: the caption starts with a fixed beginning-of-text token, the
generation prompt), so the caption's loss is the plain causal loss over its tokens.

Architecture
------------
- Decoder: token embedding tied to the output projection; rotary positions (Llama's "rotate half" layout,
  base ``rope_theta``) or learned absolute positions (``max_seq_len``); pre-LN blocks
  ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with LayerNorm; attention is one fused
  ``scaled_dot_product_attention(is_causal=True)`` call (flash attention on GPUs); MLP ``"gelu"``
  (GELU, tanh approximation: ``fc -> gelu -> proj``) or ``"swiglu"`` (``fc`` makes gate and up halves,
  ``silu(gate) * up -> proj``); a final LayerNorm.
- Span encoder: the same blocks without the causal mask, its **own** token embedding (its width differs
  from the decoder's in the METALM sizes, and a separate table lets each side learn its own input space),
  rotary positions restarting at 0 in every span, a final LayerNorm. All spans of a batch run as one
  ``(N, L)`` batch padded to the longest span, with a key padding mask, so its cost follows the span tokens
  (within the padding to the longest span), never the sequence length.
- Connector: ``"linear"`` or ``"mlp"`` (linear, GELU, linear) from the encoder's width to the decoder's,
  initialised so that its outputs start at the token embeddings' scale.
- Span placement is vectorised: one ``index_put`` writes all ``N x L`` encodings into the flattened input
  embeddings (padding positions go to a scratch row that is dropped); no Python loop over spans.
- ``set_grad_checkpointing(True)`` recomputes each block (decoder, encoder, image encoder) in the backward
  pass (non-reentrant ``torch.utils.checkpoint``).

Batch layout (what :meth:`MetaLM.forward` takes)
------------------------------------------------
``input_ids`` long ``(B, T)``; ``spans`` long ``(N, 3)``, one row ``(batch row, start, length)`` per span;
``span_ids`` long ``(N, L)``, the spans' tokens packed for the encoder (row ``i``: span ``i``'s tokens,
then anything); ``image`` float ``(B, 3, H, W)``. ``span_ids`` may be left out (it is gathered from
``input_ids``, at the cost of one device synchronisation for ``L``).

Generation
----------
:meth:`MetaLM.generate` decodes greedily or by sampling (temperature, top-k, top-p), conditioned on spans
inside the prompt and/or an image, with a key/value cache (:class:`KVCache`); ``use_cache=False``
recomputes the whole sequence at every step, which the cached path equals.

Named configurations (``create_metalm(name, **overrides)``; parameters at the vocabulary named)
------------------------------------------------------------------------------------------------
==================  ========================================================================  ==========
``metalm_1p3b``     decoder 24 x 2048 (32 heads, GELU 4x), span encoder 24 x 1024 (16 heads),     1.6675B
                    2048 tokens; vocab 50304: decoder 1.3116B (0.1030B of it the tied
                    embedding), encoder 0.3538B (0.0515B embedding), connector 2.1M; at
                    vocabulary V: 1.5130B + 3072 V
``metalm_base``     decoder 12 x 768 (12 heads), span encoder 12 x 768 (12 heads); vocab 50304      0.2480B
``metalm_demo``     decoder 4 x 128, span encoder 2 x 128: CPU demos and tests; vocab 4096          2.26M
``metalm_vl_demo``  decoder 4 x 128 and a 4 x 128 ViT on 64 px images in 8 px patches (64 image     2.16M
                    tokens), no span encoder: the image-text CPU demo; vocab 4096
==================  ========================================================================  ==========
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.models.clip import CLIP_VIT_DEFAULTS
from mmpretrain.models.text import CheckpointFn

__all__ = [
    "KVCache",
    "MetaLM",
    "SpanEncoder",
    "create_metalm",
    "gather_span_ids",
    "list_metalm_models",
    "semicausal_targets",
    "span_token_mask",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------- span layout


def span_token_mask(spans: torch.Tensor | None, batch: int, length: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``(batch, length)``: True on the tokens inside spans (the encoder's inputs); on ``spans``' device,
    else ``device``."""
    device = spans.device if spans is not None else device
    mask = torch.zeros(batch * length + 1, dtype=torch.bool, device=device)
    if spans is None or spans.shape[0] == 0:
        return mask[:-1].view(batch, length)
    # every span position is start + i for i < longest; positions past a span's end go to the scratch slot
    longest = length
    offsets = torch.arange(longest, device=spans.device)
    flat = spans[:, :1] * length + spans[:, 1:2] + offsets
    flat = torch.where(offsets < spans[:, 2:3], flat, batch * length)
    mask = mask.index_put((flat.reshape(-1),), torch.ones((), dtype=torch.bool, device=spans.device))
    return mask[:-1].view(batch, length)


def semicausal_targets(input_ids: torch.Tensor, spans: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets ``(B, T)`` aligned with the logits: column ``t`` holds token ``t + 1`` or ``ignore_index``.

    A token is a target unless it is inside a span (an encoder input), padding (``doc_ids`` -1), or the
    first of the sequence; the last column is always ignored. See the module docstring for why.
    """
    b, t = input_ids.shape
    keep = ~span_token_mask(spans, b, t, input_ids.device)
    if doc_ids is not None:
        keep &= doc_ids >= 0
    targets = input_ids[:, 1:].masked_fill(~keep[:, 1:], ignore_index)
    return torch.cat([targets, targets.new_full((b, 1), ignore_index)], dim=1)


def gather_span_ids(input_ids: torch.Tensor, spans: torch.Tensor, pad_id: int = 0,
                    width: int | None = None) -> torch.Tensor:
    """The spans' tokens packed ``(N, width)`` (default: the longest span), padded with ``pad_id``."""
    if width is None:
        width = int(spans[:, 2].max()) if spans.shape[0] else 1
    offsets = torch.arange(width, device=input_ids.device)
    pos = (spans[:, 1:2] + offsets).clamp(max=input_ids.shape[1] - 1)
    ids = input_ids[spans[:, :1], pos]
    return torch.where(offsets < spans[:, 2:3], ids, pad_id)


# ----------------------------------------------------------------------------------------- layers


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(len(positions), head_dim)`` in float32, frequencies repeated over the two halves."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(..., T, head_dim)`` by position ("rotate half" layout, as Llama and GPT-NeoX)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every decoder layer for incremental decoding.

    Holds ``(batch, heads, max_len, head_dim)`` per layer, allocated at the first write in the keys' dtype;
    ``pos`` is the number of positions already cached (the next token's position).
    """

    def __init__(self, layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values at ``pos``; return all of them so far."""
        n = k.shape[2]
        end = self.pos + n
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed the cache's max_len {self.max_len}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.pos : end] = k
        values[:, :, self.pos : end] = v
        return keys[:, :, :end], values[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection, through SDPA."""

    def __init__(self, dim: int, heads: int, causal: bool, bias: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cos is not None:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask, is_causal = key_mask, self.causal
        if cache is not None:
            offset = cache.pos
            k, v = cache.update(layer, k, v)
            if offset > 0:  # queries at offset..offset+n-1 see every key up to their own position
                is_causal = False
                if n > 1:
                    q_pos = torch.arange(offset, offset + n, device=x.device)
                    mask = q_pos[:, None] >= torch.arange(offset + n, device=x.device)[None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """``"gelu"``: fc -> GELU (tanh) -> proj; ``"swiglu"``: fc -> (gate, up) -> silu(gate) * up -> proj."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        self.fc = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, mlp: str, causal: bool, bias: bool,
                 norm_eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.attn = SelfAttention(dim, heads, causal, bias)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.mlp = MLP(dim, mlp_hidden, mlp, bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, key_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               key_mask: torch.Tensor | None, grad_checkpointing: bool, cache: KVCache | None = None,
               checkpoint_fn: CheckpointFn | None = None) -> torch.Tensor:
    """Run ``blocks`` in order; with ``grad_checkpointing`` (in training, without a cache) each block is recomputed
    in the backward pass, through ``checkpoint_fn(block, *args)`` when given (e.g. DeepSpeed's), else
    non-reentrant ``torch.utils.checkpoint``."""
    for i, block in enumerate(blocks):
        if grad_checkpointing and torch.is_grad_enabled() and cache is None:
            if checkpoint_fn is not None:
                x = checkpoint_fn(block, x, cos, sin, key_mask)
            else:
                x = checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
        else:
            x = block(x, cos, sin, key_mask, cache, i)
    return x


def _init_stack(blocks: nn.ModuleList, std: float) -> None:
    """GPT-2's initialisation: N(0, std), residual output projections N(0, std / sqrt(2 layers)), zero biases."""
    out_std = std / math.sqrt(2 * max(1, len(blocks)))
    for block in blocks:
        for norm in (block.ln_1, block.ln_2):
            nn.init.ones_(norm.weight)
            if norm.bias is not None:
                nn.init.zeros_(norm.bias)
        for linear, s in ((block.attn.qkv, std), (block.attn.proj, out_std), (block.mlp.fc, std),
                          (block.mlp.proj, out_std)):
            nn.init.normal_(linear.weight, std=s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


class SpanEncoder(nn.Module):
    """Bidirectional pre-LN transformer over packed spans (no attention across spans).

    Args:
        vocab_size: token vocabulary (its own embedding table).
        dim, layers, heads: width, depth and attention heads.
        mlp, mlp_ratio: MLP kind and hidden size as a multiple of ``dim``.
        bias: biases in linear layers and LayerNorms.
        norm_eps: LayerNorm epsilon.
        rope_theta: rotary base; positions restart at 0 in every span.
        init_std: standard deviation of the initialisation.
    """

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, mlp: str = "gelu",
                 mlp_ratio: float = 4.0, bias: bool = True, norm_eps: float = 1e-5, rope_theta: float = 10000.0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.rope_theta = rope_theta
        self.grad_checkpointing = False
        self.checkpoint_fn: CheckpointFn | None = None
        self.embed = nn.Embedding(vocab_size, dim)
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, mlp, False, bias, norm_eps) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=init_std)
            _init_stack(self.blocks, init_std)
            nn.init.ones_(self.ln_f.weight)
            if self.ln_f.bias is not None:
                nn.init.zeros_(self.ln_f.bias)

    def forward(self, span_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Span tokens ``(N, L)`` and their validity ``(N, L)`` (True before each span's end) -> ``(N, L, dim)``.

        Each row attends to its own valid positions only; outputs at invalid positions are meaningless.
        """
        length = span_ids.shape[1]
        cos, sin = rotary_cos_sin(torch.arange(length, device=span_ids.device), self.dim // self.heads,
                                  self.rope_theta)
        x = self.embed(span_ids)
        x = run_blocks(self.blocks, x, cos, sin, valid[:, None, None, :], self.grad_checkpointing,
                       checkpoint_fn=self.checkpoint_fn)
        return self.ln_f(x)


class Connector(nn.Module):
    """Encoder width -> decoder width: ``"linear"``, or ``"mlp"`` (linear, GELU, linear).

    The last layer starts at N(0, ``init_std`` / sqrt(fan-in)), so that unit-scale encoder outputs land at
    about the token embeddings' scale (``init_std``).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", init_std: float = 0.02) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"connector must be 'linear' or 'mlp', got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            self.fc = nn.Linear(in_dim, out_dim)
            self.proj = nn.Linear(out_dim, out_dim)
        else:
            self.proj = nn.Linear(in_dim, out_dim)
        with torch.no_grad():
            if kind == "mlp":
                nn.init.normal_(self.fc.weight, std=in_dim**-0.5)
                nn.init.zeros_(self.fc.bias)
            nn.init.normal_(self.proj.weight, std=init_std * self.proj.in_features**-0.5)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            x = F.gelu(self.fc(x))
        return self.proj(x)


def build_image_encoder(name: str, kwargs: dict[str, Any] | None) -> nn.Module:
    """A timm image model without head: ``"clip"`` (``VisionTransformer`` in open_clip's layout with the
    dimensions in ``kwargs``, as :class:`~mmpretrain.models.clip.VisionTower` builds it) or a timm name."""
    kwargs = dict(kwargs or {})
    if kwargs.pop("pretrained", False):
        raise ValueError("image_kwargs.pretrained: weights are never downloaded; use the task's image_init_from")
    if kwargs.pop("num_classes", 0):
        raise ValueError("image_kwargs.num_classes: the image encoder has no classifier head")
    try:
        if name == "clip":
            from timm.models.vision_transformer import VisionTransformer

            kwargs = {**CLIP_VIT_DEFAULTS, **kwargs}
            kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))
            return VisionTransformer(num_classes=0, **kwargs)
        if not timm.is_model(name):
            raise ValueError(f"image_encoder: {name!r} is neither 'clip' nor a timm model name")
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:
        raise ValueError(f"image_kwargs for {name}: {err}") from None


# ----------------------------------------------------------------------------------------- the model


class MetaLM(nn.Module):
    """Semi-causal language model: causal decoder, bidirectional span encoder, connector, optional image encoder.

    Args:
        vocab_size: token vocabulary (decoder and span encoder).
        dim: decoder width.
        layers: decoder blocks.
        heads: decoder attention heads.
        mlp: ``"gelu"`` (GELU, tanh approximation) or ``"swiglu"``, in decoder and encoder.
        mlp_ratio: decoder MLP hidden size as a multiple of ``dim`` (for SwiGLU, the hidden size of each of
            gate and up).
        positions: ``"rotary"`` or ``"learned"`` (absolute, ``max_seq_len`` of them) in the decoder.
        max_seq_len: longest decoder sequence (image tokens included); a hard limit with learned positions,
            the training length with rotary ones.
        rope_theta: rotary base (decoder and encoder).
        norm_eps: LayerNorm epsilon.
        bias: biases in the linear layers and LayerNorms (decoder and encoder).
        encoder_dim: span encoder width.
        encoder_layers: span encoder blocks; 0 for no span encoder (an image-text model).
        encoder_heads: span encoder attention heads.
        encoder_mlp_ratio: span encoder MLP hidden size as a multiple of ``encoder_dim``.
        connector: span connector, ``"linear"`` or ``"mlp"``.
        image_encoder: ``None`` (text only), ``"clip"`` (timm ``VisionTransformer`` in open_clip's layout, the
            dimensions from ``image_kwargs``; what an mmpretrain CLIP checkpoint's image tower fits) or a
            timm model name.
        image_kwargs: keyword arguments of the image encoder (``img_size``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``drop_path_rate`` ...).
        image_connector: image connector, ``"linear"`` or ``"mlp"``.
        bos_id, eos_id, pad_id: the tokenizer's special ids, recorded for generation and export
            (:meth:`generate` stops at ``eos_id`` and fills finished rows with ``pad_id``).
        init_std: standard deviation of the initialisation (GPT-2's scheme).
    """

    def __init__(
        self,
        vocab_size: int = 50304,
        dim: int = 2048,
        layers: int = 24,
        heads: int = 32,
        mlp: Literal["gelu", "swiglu"] = "gelu",
        mlp_ratio: float = 4.0,
        positions: Literal["rotary", "learned"] = "rotary",
        max_seq_len: int = 2048,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        bias: bool = True,
        encoder_dim: int = 1024,
        encoder_layers: int = 24,
        encoder_heads: int = 16,
        encoder_mlp_ratio: float = 4.0,
        connector: Literal["linear", "mlp"] = "linear",
        image_encoder: str | None = None,
        image_kwargs: dict[str, Any] | None = None,
        image_connector: Literal["linear", "mlp"] = "linear",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or dim < 1 or layers < 1 or heads < 1 or max_seq_len < 1:
            raise ValueError(f"vocab_size ({vocab_size}), dim ({dim}), layers ({layers}), heads ({heads}) and "
                             f"max_seq_len ({max_seq_len}) must be positive")
        if positions not in ("rotary", "learned"):
            raise ValueError(f"positions must be 'rotary' or 'learned', got {positions!r}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of an even size")
        if encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0, got {encoder_layers}")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (vocab_size {vocab_size})")
        self.vocab_size = vocab_size
        self.dim = dim
        self.heads = heads
        self.num_layers = layers
        self.positions = positions
        self.max_seq_len = max_seq_len
        self.rope_theta = rope_theta
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.grad_checkpointing = False
        self.checkpoint_fn: CheckpointFn | None = None

        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_seq_len, dim) if positions == "learned" else None
        self.blocks = nn.ModuleList(
            Block(dim, heads, int(dim * mlp_ratio), mlp, True, bias, norm_eps) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim, eps=norm_eps, bias=bias)

        self.encoder: SpanEncoder | None = None
        self.connector: Connector | None = None
        if encoder_layers > 0:
            self.encoder = SpanEncoder(vocab_size, encoder_dim, encoder_layers, encoder_heads, mlp, encoder_mlp_ratio,
                                       bias, norm_eps, rope_theta, init_std)
            self.connector = Connector(encoder_dim, dim, connector, init_std)

        self.image_encoder: nn.Module | None = None
        self.image_connector: Connector | None = None
        if image_encoder is not None:
            self.image_encoder = build_image_encoder(image_encoder, image_kwargs)
            self.image_connector = Connector(self.image_encoder.num_features, dim, image_connector, init_std)

        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=init_std)
            if self.pos_embed is not None:
                nn.init.normal_(self.pos_embed.weight, std=init_std)
            _init_stack(self.blocks, init_std)
            nn.init.ones_(self.ln_f.weight)
            if self.ln_f.bias is not None:
                nn.init.zeros_(self.ln_f.bias)

    # -- facts ------------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_image_tokens(self) -> int:
        """Decoder positions an image takes (its patch tokens), 0 without an image encoder."""
        if self.image_encoder is None:
            return 0
        prefix = getattr(self.image_encoder, "num_prefix_tokens", 0)
        patch_embed = getattr(self.image_encoder, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "num_patches"):
            return int(patch_embed.num_patches)
        raise ValueError(f"image encoder {type(self.image_encoder).__name__}: cannot tell its patch count "
                         f"(prefix tokens {prefix}); use a ViT")

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = getattr(getattr(self.image_encoder, "patch_embed", None), "img_size", None)
        return tuple(size) if size is not None else None

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part (decoder includes the tied embedding once) and the total."""
        def count(module: nn.Module | None) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        decoder = count(self) - count(self.encoder) - count(self.connector) - count(self.image_encoder) \
            - count(self.image_connector)
        return {
            "decoder": decoder,
            "decoder_embedding": self.embed.weight.numel(),
            "encoder": count(self.encoder),
            "encoder_embedding": self.encoder.embed.weight.numel() if self.encoder is not None else 0,
            "connector": count(self.connector),
            "image_encoder": count(self.image_encoder),
            "image_connector": count(self.image_connector),
            "total": count(self),
        }

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn: CheckpointFn | None = None) -> None:
        """Recompute each block's activations in the backward pass (decoder, span encoder, image encoder).

        ``checkpoint_fn(block, *inputs)`` replaces non-reentrant ``torch.utils.checkpoint`` for the decoder and
        span-encoder blocks (the training task passes DeepSpeed's under DeepSpeed); the timm image encoder uses
        its own checkpointing."""
        self.grad_checkpointing = enable
        self.checkpoint_fn = checkpoint_fn
        if self.encoder is not None:
            self.encoder.grad_checkpointing = enable
            self.encoder.checkpoint_fn = checkpoint_fn
        if self.image_encoder is not None:
            self.image_encoder.set_grad_checkpointing(enable)

    # -- inputs -----------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor, spans: torch.Tensor | None = None,
                     span_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input embeddings ``(B, T, dim)``: token embeddings, with the span encodings at span positions."""
        x = self.embed(input_ids)
        if spans is None or spans.shape[0] == 0:
            if self.encoder is not None and self.training and torch.is_grad_enabled():
                # no span in this batch: keep the encoder in the graph with a zero contribution, so that
                # data-parallel training finds a gradient (of zeros) for every parameter
                dummy = self.connector(self.encoder(input_ids[:1, :1], torch.ones_like(input_ids[:1, :1], dtype=torch.bool)))
                x = x + 0.0 * dummy.sum().to(x.dtype)
            return x
        if self.encoder is None:
            raise ValueError("the batch has spans but the model has no span encoder (encoder_layers is 0)")
        if spans.ndim != 2 or spans.shape[1] != 3:
            raise ValueError(f"spans must be (N, 3) rows of (batch row, start, length), got {tuple(spans.shape)}")
        if span_ids is None:
            span_ids = gather_span_ids(input_ids, spans, self.pad_id or 0)
        if span_ids.shape[0] != spans.shape[0]:
            raise ValueError(f"span_ids has {span_ids.shape[0]} rows for {spans.shape[0]} spans")
        b, t, d = x.shape
        offsets = torch.arange(span_ids.shape[1], device=x.device)
        valid = offsets < spans[:, 2:3]
        encoded = self.connector(self.encoder(span_ids, valid))  # (N, L, dim)
        flat = spans[:, :1] * t + spans[:, 1:2] + offsets
        flat = torch.where(valid, flat, b * t)  # past a span's end: the scratch row, dropped below
        x = torch.cat([x.reshape(b * t, d), x.new_zeros(1, d)])
        x = x.index_put((flat.reshape(-1),), encoded.reshape(-1, d).to(x.dtype))
        return x[:-1].view(b, t, d)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> connector-projected patch tokens ``(B, num_image_tokens, dim)``."""
        if self.image_encoder is None:
            raise ValueError("an image was given but the model has no image encoder (image_encoder is None)")
        tokens = self.image_encoder.forward_features(image)
        tokens = tokens[:, getattr(self.image_encoder, "num_prefix_tokens", 0) :]
        return self.image_connector(tokens)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward_hidden(self, input_ids: torch.Tensor, spans: torch.Tensor | None = None,
                       span_ids: torch.Tensor | None = None, image: torch.Tensor | None = None,
                       cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed decoder states ``(B, T, dim)`` of the text positions (see :meth:`forward`)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        x = self.embed_tokens(input_ids, spans, span_ids)
        prefix = 0
        if image is not None:
            image_tokens = self.encode_image(image)
            prefix = image_tokens.shape[1]
            x = torch.cat([image_tokens.to(x.dtype), x], dim=1)
        start = cache.pos if cache is not None else 0
        n = x.shape[1]
        positions = torch.arange(start, start + n, device=x.device)
        cos = sin = None
        if self.pos_embed is not None:
            if start + n > self.max_seq_len:
                raise ValueError(f"{start + n} positions exceed max_seq_len {self.max_seq_len} of the learned "
                                 "position embedding")
            x = x + self.pos_embed(positions)
        else:
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        x = run_blocks(self.blocks, x, cos, sin, None, self.grad_checkpointing, cache, self.checkpoint_fn)
        if cache is not None:
            cache.pos += n
        return self.ln_f(x[:, prefix:])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output projection."""
        return F.linear(hidden, self.embed.weight)

    def forward(self, input_ids: torch.Tensor, spans: torch.Tensor | None = None, span_ids: torch.Tensor | None = None,
                image: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)`` of the text positions: column ``t`` scores token ``t + 1``.

        Args:
            input_ids: tokens ``(B, T)``.
            spans: ``(N, 3)`` rows ``(batch row, start, length)`` of the non-causal spans (see the module docstring).
            span_ids: ``(N, L)`` the spans' tokens packed for the encoder; gathered from ``input_ids`` if None.
            image: ``(B, 3, H, W)``: its patch tokens go before the text as one non-causal span.
            cache: a :class:`KVCache` for incremental decoding (positions continue from ``cache.pos``).
        """
        return self.logits(self.forward_hidden(input_ids, spans, span_ids, image, cache))

    # -- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        spans: torch.Tensor | None = None,
        span_ids: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``input_ids`` ``(B, T)`` by up to ``max_new_tokens``; returns ``(B, T + new)``.

        Greedy when ``temperature`` is 0, else sampling from ``softmax(logits / temperature)`` restricted to the
        ``top_k`` tokens and/or the smallest set with probability ``top_p``. Spans (inside the prompt) and the
        image are encoded once; the prompt is read in one pass into a key/value cache, then one token per
        step (``use_cache=False``: the whole sequence again at each step, the reference the cache equals).
        Rows stop at ``eos_id`` (default: the model's) and are filled with ``pad_id`` (default: the model's,
        else ``eos_id``) after it; generation ends when every row has stopped. All rows share the prompt
        length (no left padding).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        eos = self.eos_id if eos_id is None else eos_id
        pad = pad_id if pad_id is not None else (self.pad_id if self.pad_id is not None else eos)
        was_training = self.training
        self.eval()
        try:
            out = input_ids
            if max_new_tokens == 0:
                return out
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            cache = None
            if use_cache:
                prefix = self.num_image_tokens if image is not None else 0
                cache = KVCache(len(self.blocks), prefix + input_ids.shape[1] + max_new_tokens)
                hidden = self.forward_hidden(input_ids, spans, span_ids, image, cache)
            for step in range(max_new_tokens):
                if not use_cache:
                    hidden = self.forward_hidden(out, spans, span_ids, image)
                token = self._next_token(self.logits(hidden[:, -1]).float(), temperature, top_k, top_p, generator)
                if eos is not None:
                    token = torch.where(finished, torch.full_like(token, pad), token)
                    finished = finished | (token == eos)
                out = torch.cat([out, token[:, None]], dim=1)
                if eos is not None and bool(finished.all()):
                    break
                if use_cache and step + 1 < max_new_tokens:
                    hidden = self.forward_hidden(token[:, None], cache=cache)
            return out
        finally:
            self.train(was_training)

    @staticmethod
    def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                    generator: torch.Generator | None) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
            drop = probs.cumsum(dim=-1) - probs >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------- named configs


def _build(preset: dict[str, Any], overrides: dict[str, Any]) -> MetaLM:
    args = dict(preset)
    for key, value in overrides.items():
        if key == "image_kwargs" and isinstance(value, dict):
            args[key] = {**(args.get(key) or {}), **value}
        else:
            args[key] = value
    return MetaLM(**args)


def metalm_1p3b(**overrides: Any) -> MetaLM:
    """METALM's semi-causal LM sizes: decoder 24 x 2048 (32 heads), span encoder 24 x 1024 (16 heads), 2048 tokens."""
    return _build(dict(dim=2048, layers=24, heads=32, max_seq_len=2048, encoder_dim=1024, encoder_layers=24,
                       encoder_heads=16), overrides)


def metalm_base(**overrides: Any) -> MetaLM:
    """A GPT-2-small-sized decoder (12 x 768, 12 heads) with a span encoder of the same size, 2048 tokens."""
    return _build(dict(dim=768, layers=12, heads=12, max_seq_len=2048, encoder_dim=768, encoder_layers=12,
                       encoder_heads=12), overrides)


def metalm_demo(**overrides: Any) -> MetaLM:
    """A tiny text model for CPU demos and tests: decoder 4 x 128 (4 heads), span encoder 2 x 128 (4 heads)."""
    return _build(dict(vocab_size=4096, dim=128, layers=4, heads=4, max_seq_len=256, encoder_dim=128,
                       encoder_layers=2, encoder_heads=4), overrides)


def metalm_vl_demo(**overrides: Any) -> MetaLM:
    """A tiny image-text model: decoder 4 x 128, a 4 x 128 ViT on 64 px images in 8 px patches (64 tokens)."""
    return _build(dict(vocab_size=4096, dim=128, layers=4, heads=4, max_seq_len=128, encoder_layers=0,
                       image_encoder="clip",
                       image_kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4)), overrides)


METALM_MODELS: dict[str, Callable[..., MetaLM]] = {
    "metalm_1p3b": metalm_1p3b,
    "metalm_base": metalm_base,
    "metalm_demo": metalm_demo,
    "metalm_vl_demo": metalm_vl_demo,
}


def list_metalm_models() -> list[str]:
    return sorted(METALM_MODELS)


def create_metalm(name: str, **overrides: Any) -> MetaLM:
    """Build the named configuration (see the module docstring), with :class:`MetaLM` arguments overridden."""
    try:
        factory = METALM_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown METALM configuration {name!r}; choose one of {list_metalm_models()}") from None
    return factory(**overrides)
