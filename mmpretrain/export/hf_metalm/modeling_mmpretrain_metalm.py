"""METALM semi-causal language models exported by mmpretrain, as transformers remote code.

Self-contained: needs torch and transformers only, never mmpretrain (nor timm).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    out = model.generate(**tokenizer("a prompt", return_tensors="pt"), max_new_tokens=20)

What the model is
-----------------
A causal decoder (pre-LN blocks, fused attention through ``scaled_dot_product_attention``, rotary or learned
positions, GELU or SwiGLU MLPs, the output projection tied to the token embedding) reads the tokens left to
right. Non-causal **spans** of the input, given as ``spans`` ``(N, 3)`` rows ``(batch row, start, length)``
(positions in ``input_ids``; spans must not overlap), are read by a bidirectional span encoder instead: each
span is encoded on its own with full attention inside it, projected by a connector and written into the
decoder's input at the span's positions. With an image encoder, ``pixel_values`` ``(B, 3, H, W)`` become patch
tokens that go before the text as one non-causal prefix (the logits cover the text positions only).

Inputs beyond a plain causal LM
-------------------------------
- ``spans`` long ``(N, 3)`` and optionally ``span_ids`` long ``(N, L)`` (each span's tokens, padded to the
  longest; gathered from ``input_ids`` when left out). ``generate(input_ids, spans=...)`` encodes the spans
  of the prompt once, at the prefill; beam search and ``num_return_sequences`` copy them to every copy of a
  row.
- ``pixel_values`` float ``(B, 3, H, W)`` at the image encoder's size (the directory's image processor makes
  them).
- ``attention_mask`` ``(B, text length so far)``: 0 on padding tokens (left padding for batched prompts).
  Positions then count the real tokens only, so a padded row gives what it gives alone. Without zeros it
  changes nothing.
- ``labels`` ``(B, T)`` aligned with ``input_ids``: the mean next-token loss over the labels that are not
  -100, where, as in METALM training, tokens inside spans (encoder inputs) are never targets.

The key/value cache is a transformers ``Cache`` (``DynamicCache`` by default); it holds the image tokens
too, so positions continue after them. Not supported: ``output_attentions``, 4-D attention masks,
``position_ids``; static caches and ``torch.compile``d generation are untested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_mmpretrain_metalm import MetaLMConfig

IGNORE_INDEX = -100
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


# -- positions and span layout -------------------------------------------------------------------------------
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(n,)`` or ``(B, n)`` -> cos and sin ``(n, head_dim)`` or ``(B, 1, n, head_dim)`` in float32
    ("rotate half" layout: the frequencies repeated over the two halves)."""
    steps = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = theta ** (-steps / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if positions.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def span_token_mask(spans: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Bool ``(batch, length)``: True on the tokens inside ``spans``, ``(N, 3)`` rows ``(batch row, start,
    length)``."""
    mask = torch.zeros(batch * length + 1, dtype=torch.bool, device=spans.device)
    if spans.shape[0]:
        offsets = torch.arange(length, device=spans.device)
        flat = spans[:, :1] * length + spans[:, 1:2] + offsets
        flat = torch.where(offsets < spans[:, 2:3], flat, batch * length)  # past a span's end: scratch slot
        mask[flat.reshape(-1)] = True
    return mask[:-1].view(batch, length)


def gather_span_ids(input_ids: torch.Tensor, spans: torch.Tensor, width: int,
                    pad_id: int = 0) -> torch.Tensor:
    """The spans' tokens ``(N, width)`` from ``input_ids``, padded with ``pad_id`` after each span's end."""
    offsets = torch.arange(width, device=input_ids.device)
    pos = (spans[:, 1:2] + offsets).clamp(max=input_ids.shape[1] - 1)
    ids = input_ids[spans[:, :1], pos]
    return torch.where(offsets < spans[:, 2:3], ids, pad_id)


# -- language-model layers (decoder and span encoder) --------------------------------------------------------
class MetaLMAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection, rotary positions, through SDPA."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, is_causal: bool, cache: Cache | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cos is not None:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MetaLMMLP(nn.Module):
    """"gelu": fc -> GELU (tanh approximation) -> proj; "swiglu": fc -> (gate, up) -> silu(gate) * up ->
    proj."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
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


class MetaLMBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, mlp: str, bias: bool, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.attn = MetaLMAttention(dim, heads, bias)
        self.ln_2 = nn.LayerNorm(dim, eps=eps, bias=bias)
        self.mlp = MetaLMMLP(dim, hidden, mlp, bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, is_causal: bool, cache: Cache | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, mask, is_causal, cache, layer_idx)
        return x + self.mlp(self.ln_2(x))


class MetaLMSpanEncoder(nn.Module):
    """Bidirectional encoder over packed spans: its own token embedding, rotary positions restarting at 0 in
    every span, full attention inside each span (a key padding mask past its end), a final LayerNorm."""

    def __init__(self, config: MetaLMConfig) -> None:
        super().__init__()
        dim = config.encoder_hidden_size
        self.heads = config.encoder_num_attention_heads
        self.head_dim = dim // self.heads
        self.rope_theta = config.rope_theta
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.blocks = nn.ModuleList(
            MetaLMBlock(dim, self.heads, config.encoder_intermediate_size, config.mlp, config.bias,
                        config.layer_norm_eps)
            for _ in range(config.encoder_num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)

    def forward(self, span_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Span tokens ``(N, L)`` and their validity ``(N, L)`` -> encodings ``(N, L, dim)`` (meaningless
        where not valid)."""
        cos, sin = rotary_cos_sin(torch.arange(span_ids.shape[1], device=span_ids.device), self.head_dim,
                                  self.rope_theta)
        x = self.embed(span_ids)
        mask = valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, cos, sin, mask, False)
        return self.ln_f(x)


class MetaLMConnector(nn.Module):
    """Encoder width -> decoder width: "linear" (proj) or "mlp" (fc, exact GELU, proj)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.fc = nn.Linear(in_dim, out_dim)
            self.proj = nn.Linear(out_dim, out_dim)
        else:
            self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            x = F.gelu(self.fc(x))
        return self.proj(x)


# -- image encoder: a plain ViT in timm's layout -------------------------------------------------------------
def _vision_act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


class MetaLMPatchEmbed(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.image_size = tuple(cfg["image_size"])
        self.proj = nn.Conv2d(cfg["num_channels"], cfg["hidden_size"], kernel_size=tuple(cfg["patch_size"]),
                              stride=tuple(cfg["patch_size"]), bias=cfg["patch_bias"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            height, width = self.image_size
            raise ValueError(f"pixel_values must be (batch, channels, {height}, {width}) for this image "
                             f"encoder, got {tuple(pixel_values.shape)}; use the directory's image processor")
        return self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class MetaLMLayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class MetaLMVisionAttention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg["qkv_bias"])
        self.proj = nn.Linear(dim, dim, bias=cfg["proj_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class MetaLMVisionMLP(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=cfg["mlp_bias"])
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=cfg["mlp_bias"])
        self.act = _vision_act(cfg["hidden_act"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaLMVisionBlock(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MetaLMVisionAttention(cfg)
        self.ls1 = MetaLMLayerScale(dim) if cfg["layer_scale"] else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MetaLMVisionMLP(cfg)
        self.ls2 = MetaLMLayerScale(dim) if cfg["layer_scale"] else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MetaLMVisionEncoder(nn.Module):
    """Images -> patch tokens ``(B, num_patches, hidden)`` (class and register tokens dropped after the
    blocks)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.patch_embed = MetaLMPatchEmbed(cfg)
        grid = [s // p for s, p in zip(cfg["image_size"], cfg["patch_size"])]
        self.num_patches = grid[0] * grid[1]
        self.no_embed_class = cfg["no_embed_class"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg["class_token"] else None
        regs = cfg["num_register_tokens"]
        self.reg_token = nn.Parameter(torch.zeros(1, regs, dim)) if regs else None
        self.num_prefix_tokens = int(cfg["class_token"]) + regs
        if cfg["position_embedding"]:
            n = self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        else:
            self.pos_embed = None
        eps = cfg["layer_norm_eps"]
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if cfg["pre_norm"] else nn.Identity()
        self.blocks = nn.ModuleList(MetaLMVisionBlock(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = nn.LayerNorm(dim, eps=eps) if cfg["final_norm"] else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed
        x = torch.cat([*prefix, x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, self.num_prefix_tokens :]


# -- models --------------------------------------------------------------------------------------------------
class MetaLMPreTrainedModel(PreTrainedModel):
    config_class = MetaLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MetaLMBlock", "MetaLMVisionBlock"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """An exported checkpoint holds every weight, so nothing is re-initialised here (modules built from a
        config alone keep PyTorch's initialisation)."""


class MetaLMModel(MetaLMPreTrainedModel):
    """The decoder with its span encoder, connectors and image encoder: final-normed hidden states of the text
    positions (``last_hidden_state`` ``(B, T, hidden)``) and the key/value cache."""

    def __init__(self, config: MetaLMConfig) -> None:
        super().__init__(config)
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = dim // self.heads
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.pos_embed = (nn.Embedding(config.max_position_embeddings, dim)
                          if config.position_embedding == "learned" else None)
        self.blocks = nn.ModuleList(
            MetaLMBlock(dim, self.heads, config.intermediate_size, config.mlp, config.bias,
                        config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)
        self.encoder = self.connector = None
        if config.encoder_num_hidden_layers > 0:
            self.encoder = MetaLMSpanEncoder(config)
            self.connector = MetaLMConnector(config.encoder_hidden_size, dim, config.connector)
        self.image_encoder = self.image_connector = None
        if config.image_encoder_config is not None:
            self.image_encoder = MetaLMVisionEncoder(config.image_encoder_config)
            self.image_connector = MetaLMConnector(config.image_encoder_config["hidden_size"], dim,
                                                   config.image_connector)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def place_spans(self, x: torch.Tensor, input_ids: torch.Tensor | None, spans: torch.Tensor,
                    span_ids: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``x`` ``(B, T, dim)`` with the spans' connector-projected encodings at their
        positions."""
        if self.encoder is None:
            raise ValueError("spans were given but this model has no span encoder (encoder_num_hidden_layers "
                             "is 0)")
        if spans.ndim != 2 or spans.shape[1] != 3:
            raise ValueError(f"spans must be (N, 3) rows of (batch row, start, length), got "
                             f"{tuple(spans.shape)}")
        spans = spans.to(device=x.device, dtype=torch.long)
        b, t, d = x.shape
        rows, starts, lengths = spans.unbind(1)
        outside = (rows < 0) | (rows >= b) | (starts < 0) | (lengths < 1) | (starts + lengths > t)
        if bool(outside.any()):
            raise ValueError(f"spans {spans[outside][:3].tolist()} do not lie inside the input of shape "
                             f"({b}, {t}): rows are (batch row, start, length) in the positions of this "
                             "call's input_ids")
        longest = int(lengths.max())
        if span_ids is None:
            if input_ids is None:
                raise ValueError("spans with inputs_embeds need span_ids (each span's tokens)")
            span_ids = gather_span_ids(input_ids, spans, longest, self.config.pad_token_id or 0)
        span_ids = span_ids.to(x.device)
        if span_ids.shape[0] != spans.shape[0] or span_ids.shape[1] < longest:
            raise ValueError(f"span_ids {tuple(span_ids.shape)} must have a row per span ({spans.shape[0]}) "
                             f"and at least the longest span's length ({longest}) of columns")
        offsets = torch.arange(span_ids.shape[1], device=x.device)
        valid = offsets < spans[:, 2:3]
        encoded = self.connector(self.encoder(span_ids, valid))
        flat = spans[:, :1] * t + spans[:, 1:2] + offsets
        flat = torch.where(valid, flat, b * t)  # past a span's end: a scratch row, dropped below
        x = torch.cat([x.reshape(b * t, d), x.new_zeros(1, d)])
        x = x.index_put((flat.reshape(-1),), encoded.reshape(-1, d).to(x.dtype))
        return x[:-1].view(b, t, d)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> connector-projected patch tokens ``(B, num_image_tokens, hidden)``."""
        if self.image_encoder is None:
            raise ValueError("pixel_values were given but this model has no image encoder")
        return self.image_connector(self.image_encoder(pixel_values))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        spans: torch.LongTensor | None = None,
        span_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """See the module docstring for ``spans``, ``span_ids``, ``pixel_values`` and ``attention_mask``.

        ``hidden_states`` (with ``output_hidden_states``): the decoder's input and each block's output over
        the whole sequence (image tokens included), before the final norm.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if spans is not None and spans.numel():
            x = self.place_spans(x, input_ids, spans, span_ids)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefix = 0
        if pixel_values is not None:
            if past:
                raise ValueError("pixel_values go with the first call of a sequence (an empty cache): the "
                                 "image comes before the text")
            image = self.encode_image(pixel_values)
            prefix = image.shape[1]
            x = torch.cat([image.to(x.dtype), x], dim=1)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache or past else None
        n = x.shape[1]
        total = past + n

        key_valid = None  # (B, total) False on padding keys, or None without padding
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(f"attention_mask must be 2-D (batch, length), got "
                                 f"{tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                extra = total - attention_mask.shape[1]  # the image tokens, outside the text's mask
                if extra < 0:
                    raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but the "
                                     f"sequence has {total}")
                text = attention_mask.to(device=x.device, dtype=torch.bool)
                key_valid = torch.cat([text.new_ones(text.shape[0], extra), text], dim=1)
        if key_valid is None:
            positions = torch.arange(past, total, device=x.device)
        else:  # count the real tokens only: a padded row gets the positions it would have alone
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

        cos = sin = None
        if self.pos_embed is not None:
            longest = total if key_valid is None else int(positions.max()) + 1
            if longest > self.config.max_position_embeddings:
                raise ValueError(f"{longest} positions exceed max_position_embeddings "
                                 f"{self.config.max_position_embeddings} of the learned position embedding")
            x = x + self.pos_embed(positions)
        else:
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.config.rope_theta)

        mask, is_causal = None, False
        keys = torch.arange(total, device=x.device)
        queries = torch.arange(past, total, device=x.device)
        if key_valid is not None:
            # causal, no padding keys; a query always sees itself so that padding rows stay finite
            causal = keys[None, :] <= queries[:, None]
            itself = keys[None, :] == queries[:, None]
            mask = (causal[None] & (key_valid[:, None, :] | itself[None]))[:, None]
        elif past == 0:
            is_causal = True
        elif n > 1:
            mask = keys[None, :] <= queries[:, None]

        hidden_states = (x,) if output_hidden_states else None
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and cache is None:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, mask, is_causal)
            else:
                x = block(x, cos, sin, mask, is_causal, cache, i)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        x = self.ln_f(x[:, prefix:])
        cache_out = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (x, cache_out, hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache_out,
                                       hidden_states=hidden_states)


class MetaLMForCausalLM(MetaLMPreTrainedModel, GenerationMixin):
    """METALM with its tied output projection: next-token logits of the text positions (column ``t`` scores
    token ``t + 1``), loss on ``labels``, and ``generate`` conditioned on spans and/or an image."""

    # transformers 5 maps each tied weight to its source; transformers 4 lists them
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: MetaLMConfig) -> None:
        super().__init__(config)
        self.model = MetaLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        spans: torch.LongTensor | None = None,
        span_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``(B, T, vocab)`` of the text positions (the last ``logits_to_keep`` only, when it is > 0);
        with ``labels`` the METALM loss (see the module docstring)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, spans=spans, span_ids=span_ids,
                         pixel_values=pixel_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
        else:
            keep = logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(f"labels cover {labels.shape[1]} positions but logits were kept for "
                                 f"{logits.shape[1]}: leave logits_to_keep at 0 to compute the loss")
            labels = labels.to(logits.device)
            if spans is not None and spans.numel():  # encoder inputs are never targets
                inside = span_token_mask(spans.to(device=labels.device, dtype=torch.long), *labels.shape)
                labels = labels.masked_fill(inside, IGNORE_INDEX)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        if not return_dict:
            rest = tuple(v for v in (out.past_key_values, out.hidden_states) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)

    # -- generation ----------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Cache | None = None,
                                      spans: torch.LongTensor | None = None,
                                      span_ids: torch.LongTensor | None = None,
                                      pixel_values: torch.Tensor | None = None, **kwargs):
        """transformers' preparation, with the spans and the image given to the first call of a sequence only
        (the prefill, whose cache is empty), or to every call when there is no cache (each reads the whole
        sequence)."""
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        inputs.pop("pixel_values", None)
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            if spans is not None:
                inputs["spans"], inputs["span_ids"] = spans, span_ids
            if pixel_values is not None:
                inputs["pixel_values"] = pixel_values
        return inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """transformers' expansion of every batch row into ``expand_size`` copies (beam search,
        ``num_return_sequences``), with each span copied to every copy of its row (spans are not
        batch-major)."""
        spans = model_kwargs.pop("spans", None)
        span_ids = model_kwargs.pop("span_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder,
                                                                        input_ids, **model_kwargs)
        if spans is not None and expand_size > 1:
            copies = torch.arange(expand_size, device=spans.device)
            rows = (spans[:, :1] * expand_size + copies).reshape(-1, 1)
            spans = torch.cat([rows, spans[:, 1:].repeat_interleave(expand_size, dim=0)], dim=1)
            if span_ids is not None:
                span_ids = span_ids.repeat_interleave(expand_size, dim=0)
        if spans is not None:
            model_kwargs["spans"] = spans
            model_kwargs["span_ids"] = span_ids
        return input_ids, model_kwargs


__all__ = ["MetaLMForCausalLM", "MetaLMModel", "MetaLMPreTrainedModel", "gather_span_ids", "span_token_mask"]
