"""The tiny Llama the demo and the command line train, built from a config (no download)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers

def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    block_size: int = 128,
    seed: int = 0,
    **config_overrides: Any,
) -> transformers.LlamaForCausalLM:
    """A small Llama built from a config (no download), its weights drawn from ``seed``.

    Defaults give about 0.9M parameters at ``vocab_size=1024``: tied embeddings, SwiGLU width
    ``8/3 * hidden_size`` rounded up to a multiple of 16, SDPA attention. Pass token ids
    (``pad_token_id=``, ``eos_token_id=``, ``bos_token_id=``) or any other ``LlamaConfig`` field
    through ``config_overrides``. The global torch RNG is left untouched.
    """
    import torch
    import transformers

    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by heads={heads}")
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=16 * math.ceil(8 * hidden_size / 3 / 16),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block_size,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    settings.update(config_overrides)
    config = transformers.LlamaConfig(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model
