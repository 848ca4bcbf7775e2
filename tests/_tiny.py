"""Tiny models and token data for tests: built from configs, seeded, no downloads.

Import from tests as ``from _tiny import tiny_llama, token_batches, named_batches`` (pytest puts
``tests/`` on ``sys.path``), or from a script with ``sys.path.insert(0, <tests dir>)``.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

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


def token_batches(
    n_batches: int,
    *,
    batch_size: int = 2,
    seq_len: int = 12,
    vocab_size: int = 64,
    seed: int = 0,
    prompt_len: int = 2,
    pad: bool = True,
    low: int = 0,
    high: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Random causal-LM batches: ``input_ids``, ``attention_mask`` and ``labels``.

    The first ``prompt_len`` labels of each row are ``-100`` (a prompt), and with ``pad`` each row
    after the first gets a random amount of right padding (mask 0, label ``-100``), so the token
    counts differ between rows and batches. Token ids are drawn from ``[low, high)`` so that
    domains can be given different distributions.
    """
    generator = torch.Generator().manual_seed(seed)
    high = vocab_size if high is None else high
    batches = []
    for _ in range(n_batches):
        input_ids = torch.randint(low, high, (batch_size, seq_len), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if pad:
            for row in range(1, batch_size):
                n_pad = int(torch.randint(0, seq_len // 2, (1,), generator=generator))
                if n_pad:
                    attention_mask[row, -n_pad:] = 0
                    input_ids[row, -n_pad:] = 0
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, :prompt_len] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def named_batches(names, n_batches: int = 2, *, seed: int = 0, vocab_size: int = 64, **kwargs):
    """``{name: token_batches(...)}`` with a different seed and token range per name."""
    out = {}
    width = max(8, vocab_size // 2)
    for index, name in enumerate(names):
        low = (index * 7) % (vocab_size - width + 1)
        out[name] = token_batches(
            n_batches, seed=seed * 1000 + index, vocab_size=vocab_size, low=low, high=low + width, **kwargs
        )
    return out


def to_device(batches, device):
    """Move a ``{name: [batch, ...]}`` mapping to ``device``."""
    return {name: [{k: v.to(device) for k, v in b.items()} for b in bs] for name, bs in batches.items()}


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
