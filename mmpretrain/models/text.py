"""CLIP's text tower: a causal pre-LN transformer pooled at the end-of-text token.

Layout and initialisation follow open_clip's ``TextTransformer`` (the text side of its ViT-B-32 / ViT-B-16
configurations): token + learned position embeddings, pre-LN residual blocks (causal self-attention, GELU
MLP), a final LayerNorm, a bias-free projection to the joint embedding space. Attention is one fused
``scaled_dot_product_attention(is_causal=True)`` call, so no mask is materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: a recomputation function: ``fn(block, *inputs)`` returns ``block(*inputs)`` and recomputes it in the backward
#: pass (DeepSpeed's ``deepspeed.checkpointing.checkpoint`` fits); the models fall back to non-reentrant
#: ``torch.utils.checkpoint`` when none is given. Models never import the library that provides one.
CheckpointFn = Callable[..., torch.Tensor]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused query/key/value projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by text heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, n, head_dim)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TextBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Causal text transformer pooled at the end-of-text token, projected to ``output_dim``.

    Args:
        vocab_size: token vocabulary size (the tokenizer's ``vocab_size``).
        context_length: longest token sequence (number of learned positions); shorter inputs use the
            first positions.
        width: hidden size.
        heads: attention heads.
        layers: residual blocks.
        output_dim: joint embedding size (the projection's output).
        eot_id: the end-of-text token id (the tokenizer's ``eos_id``). Features are pooled at the first
            position after position 0 that holds ``eot_id`` in each row (position 0 is skipped so that a
            begin-of-text token with the same id, as in GPT-2-style vocabularies, is not taken for it;
            padding with that id after it is harmless); a row without it is pooled at its last position. ``None``: pooled at the argmax of the token ids, as open_clip
            does for the CLIP BPE, whose end-of-text id is the largest id in the vocabulary -- only
            right for tokenizers with that property.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        norm_eps: LayerNorm epsilon.

    Initialisation (open_clip's numbers): token embedding N(0, 0.02), positions N(0, 0.01), query/key/value
    N(0, width^-0.5), MLP input N(0, (2 width)^-0.5), both residual output projections
    N(0, width^-0.5 (2 layers)^-0.5), projection N(0, width^-0.5); biases zero, LayerNorms identity.
    (open_clip leaves its MLP biases at PyTorch's default uniform init; zero is used here.)
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        output_dim: int = 512,
        eot_id: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or context_length < 1 or layers < 1:
            raise ValueError(
                f"text tower: vocab_size ({vocab_size}), context_length ({context_length}) and layers ({layers}) "
                "must be positive"
            )
        if eot_id is not None and not 0 <= eot_id < vocab_size:
            raise ValueError(f"text tower: eot_id {eot_id} is outside the vocabulary (vocab_size {vocab_size})")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.layers = layers
        self.output_dim = output_dim
        self.eot_id = eot_id
        self.grad_checkpointing = False
        self.checkpoint_fn: CheckpointFn | None = None

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio, norm_eps) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self.proj = nn.Linear(width, output_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            for norm in (block.ln_1, block.ln_2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
            for linear, std in ((block.attn.qkv, attn_std), (block.attn.out_proj, proj_std),
                                (block.mlp.fc, fc_std), (block.mlp.proj, proj_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
        nn.init.ones_(self.ln_final.weight)
        nn.init.zeros_(self.ln_final.bias)
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn: CheckpointFn | None = None) -> None:
        """Recompute each block's activations in the backward pass: through ``checkpoint_fn(block, x)`` when given
        (see :data:`CheckpointFn`), else non-reentrant ``torch.utils.checkpoint``."""
        self.grad_checkpointing = enable
        self.checkpoint_fn = checkpoint_fn

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, length)`` -> final-normed hidden states ``(batch, length, width)``."""
        if tokens.ndim != 2:
            raise ValueError(f"text tower: expected token ids of shape (batch, length), got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"text tower: {length} tokens per row but context_length is {self.context_length}; "
                "tokenize with a context_length no larger than the model's"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = self.checkpoint_fn(block, x) if self.checkpoint_fn is not None else checkpoint(
                    block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_final(x)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (end-of-text) position in each row; see ``eot_id``."""
        if self.eot_id is None:
            return tokens.argmax(dim=-1)
        length = tokens.shape[1]
        if length == 1:
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        # from position 1: a begin-of-text token may share the end-of-text id (and padding may too)
        is_eot = tokens[:, 1:] == self.eot_id
        first = is_eot.int().argmax(dim=-1) + 1  # argmax returns the first maximal index
        return torch.where(is_eot.any(dim=-1), first, torch.full_like(first, length - 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(batch, length)`` -> projected, unnormalised text features ``(batch, output_dim)``."""
        x = self.forward_features(tokens)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(tokens)]
        return self.proj(pooled)
