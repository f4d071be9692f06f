"""Configuration of METALM semi-causal language models exported by mmpretrain (transformers remote code).

Self-contained: needs torch and transformers only, never mmpretrain.
"""

from __future__ import annotations

from typing import Any

try:  # transformers 5 spells it PreTrainedConfig and keeps the old name as an alias
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as _BaseConfig

# the image encoder's settings (a plain ViT in timm's layout) and their defaults
IMAGE_ENCODER_DEFAULTS: dict[str, Any] = {
    "image_size": [224, 224],  # input (height, width); inputs must have this size
    "patch_size": [16, 16],
    "num_channels": 3,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",  # "gelu" (exact), "gelu_tanh" or "quick_gelu"
    "layer_norm_eps": 1e-6,
    "patch_bias": True,  # bias on the patch-embedding convolution
    "qkv_bias": True,
    "proj_bias": True,  # bias on the attention output projection
    "mlp_bias": True,
    "class_token": True,
    "num_register_tokens": 0,
    "position_embedding": True,  # learned absolute positions
    "no_embed_class": False,  # True: the position embedding covers the patches only, not class/registers
    "pre_norm": False,  # a LayerNorm before the blocks
    "final_norm": True,  # a LayerNorm after the blocks
    "layer_scale": False,  # per-channel scales on the residual branches
}


class MetaLMConfig(_BaseConfig):
    """METALM semi-causal LM: causal decoder, bidirectional span encoder, connectors, image encoder.

    Args:
        vocab_size: token vocabulary (decoder and span encoder).
        hidden_size: decoder width.
        num_hidden_layers: decoder blocks.
        num_attention_heads: decoder attention heads.
        intermediate_size: decoder MLP hidden size (for "swiglu", of each of the gate and up halves).
        mlp: "gelu" (GELU, tanh approximation; fc -> gelu -> proj) or "swiglu" (silu(gate) * up -> proj), in
            decoder and span encoder.
        position_embedding: "rotary" ("rotate half" layout, base ``rope_theta``) or "learned" (absolute,
            ``max_position_embeddings`` of them) in the decoder.
        max_position_embeddings: longest decoder sequence the model was trained for (image tokens
            included); a hard limit with learned positions.
        rope_theta: rotary base (decoder and span encoder).
        layer_norm_eps: LayerNorm epsilon (decoder and span encoder).
        bias: biases in the linear layers and LayerNorms of decoder and span encoder.
        encoder_hidden_size, encoder_num_hidden_layers, encoder_num_attention_heads,
        encoder_intermediate_size: the bidirectional span encoder; ``encoder_num_hidden_layers`` 0 for none.
        connector: span connector, "linear" or "mlp" (linear, exact GELU, linear).
        image_encoder_config: the image encoder (keys and defaults: ``IMAGE_ENCODER_DEFAULTS``), or None for
            a text-only model.
        image_connector: image connector, "linear" or "mlp".
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special ids.
        tie_word_embeddings: the output projection is the token embedding (always, in METALM).
        use_cache: return a key/value cache from forward by default.
    """

    model_type = "mmpretrain_metalm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        intermediate_size: int = 8192,
        mlp: str = "gelu",
        position_embedding: str = "rotary",
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        encoder_hidden_size: int = 1024,
        encoder_num_hidden_layers: int = 24,
        encoder_num_attention_heads: int = 16,
        encoder_intermediate_size: int = 4096,
        connector: str = "linear",
        image_encoder_config: dict[str, Any] | None = None,
        image_connector: str = "linear",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if mlp not in ("gelu", "swiglu"):
            raise ValueError(f"MetaLMConfig.mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        if position_embedding not in ("rotary", "learned"):
            raise ValueError("MetaLMConfig.position_embedding must be 'rotary' or 'learned', got "
                             f"{position_embedding!r}")
        for name, kind in (("connector", connector), ("image_connector", image_connector)):
            if kind not in ("linear", "mlp"):
                raise ValueError(f"MetaLMConfig.{name} must be 'linear' or 'mlp', got {kind!r}")
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"MetaLMConfig: hidden_size {hidden_size} must split into {num_attention_heads} "
                             "heads of an even size")
        if not tie_word_embeddings:
            raise ValueError("MetaLMConfig.tie_word_embeddings: METALM always ties its output projection to "
                             "the token embedding")
        if image_encoder_config is not None:
            unknown = set(image_encoder_config) - set(IMAGE_ENCODER_DEFAULTS)
            if unknown:
                raise ValueError(f"MetaLMConfig.image_encoder_config: unknown keys {sorted(unknown)}; known: "
                                 f"{sorted(IMAGE_ENCODER_DEFAULTS)}")
            image_encoder_config = {**IMAGE_ENCODER_DEFAULTS, **image_encoder_config}
            for key in ("image_size", "patch_size"):
                value = image_encoder_config[key]
                pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
                image_encoder_config[key] = pair
            if image_encoder_config["hidden_act"] not in ("gelu", "gelu_tanh", "quick_gelu"):
                raise ValueError("MetaLMConfig.image_encoder_config.hidden_act must be 'gelu', 'gelu_tanh' "
                                 f"or 'quick_gelu', got {image_encoder_config['hidden_act']!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.mlp = mlp
        self.position_embedding = position_embedding
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.bias = bias
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_num_hidden_layers = encoder_num_hidden_layers
        self.encoder_num_attention_heads = encoder_num_attention_heads
        self.encoder_intermediate_size = encoder_intermediate_size
        self.connector = connector
        self.image_encoder_config = image_encoder_config
        self.image_connector = image_connector
        self.use_cache = use_cache
        # through the base class, which in transformers 4 sets them itself (and would reset them to its
        # defaults)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Decoder positions an image takes (its patch tokens); 0 without an image encoder."""
        cfg = self.image_encoder_config
        if cfg is None:
            return 0
        return (cfg["image_size"][0] // cfg["patch_size"][0]) * (cfg["image_size"][1] // cfg["patch_size"][1])
