"""The tiny models of the tests: built from configs, seeded, no downloads.

Import from tests as ``from helpers.models import tiny_llama, toy_model`` (pytest puts ``tests/``
on ``sys.path``), or from a script with ``sys.path.insert(0, <tests dir>)``.
"""

from __future__ import annotations

import torch

from .data import IGNORE_INDEX

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    """A 2-layer ``LlamaForCausalLM`` (about 7k parameters) with seeded weights, in ``dtype``.

    At float64 the RMSNorm layers are switched to :class:`Float64RMSNorm`: Hugging Face's Llama
    norm computes in float32 whatever the model dtype, which puts ~1e-8 relative noise into
    gradients (enough to break 1e-10 brute-force comparisons whenever two computations scale a
    loss differently). With that swap, and SDPA attention (eager attention also has a float32
    softmax), the model is exact to fp64 rounding.
    """
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**overrides)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model = model.to(dtype)
    if dtype == torch.float64:
        norm_class = _float64_rms_norm()
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.__class__ = norm_class
    return model


def _float64_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Float64RMSNorm(LlamaRMSNorm):
        """LlamaRMSNorm without its float32 round trip (same parameters, same state dict)."""

        def forward(self, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    return Float64RMSNorm


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model of the toy pre-training set-up (:mod:`helpers.data`): vocabulary 64, 16 positions."""
    from .data import SEQ, VOCAB

    return tiny_llama(seed, dtype, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      max_position_embeddings=SEQ)


def reference_summed_loss(model, batch):
    """Brute-force reference: summed next-token cross-entropy in fp64 with an explicit shift and mask.

    Returns ``(summed loss, labelled token count)``; independent of tikmix_hf's own loss code.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(picked * mask).sum(), int(mask.sum())
