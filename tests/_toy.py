"""A toy pre-training set-up where the right mixture is obvious, for Trainer-level tests.

Domains (vocabulary 64, sequences of 16 tokens):
- ``pattern``: counting sequences ``t, t+1, t+2, ... (mod 32)`` from a random start;
- ``echo``: a random half-sequence over tokens 0-31 repeated twice;
- ``noise``: uniform random tokens 32-63.
The validation task ``held_out_pattern`` is fresh counting sequences, so up-weighting ``pattern``
is what lowers its loss and ``noise`` can only hurt it.
"""

from __future__ import annotations

import numpy as np
import torch

SEQ = 16
VOCAB = 64


def _pattern(rng, n):
    starts = rng.integers(0, 32, size=n)
    return [((s + np.arange(SEQ)) % 32).tolist() for s in starts]


def _echo(rng, n):
    out = []
    for _ in range(n):
        half = rng.integers(0, 32, size=SEQ // 2)
        out.append(np.concatenate([half, half]).tolist())
    return out


def _noise(rng, n):
    return rng.integers(32, 64, size=(n, SEQ)).tolist()


def _examples(domain, seqs):
    return [
        {"input_ids": s, "attention_mask": [1] * SEQ, "labels": s, "sid": f"{domain}:{i}"} for i, s in enumerate(seqs)
    ]


def toy_domains(n: int = 256, seed: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    return {
        "pattern": _examples("pattern", _pattern(rng, n)),
        "echo": _examples("echo", _echo(rng, n)),
        "noise": _examples("noise", _noise(rng, n)),
    }


def toy_validation(n: int = 32, seed: int = 1) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    return {"held_out_pattern": _examples("val", _pattern(rng, n))}


class RecordingCollator:
    """Collates the toy examples and records the ``sid`` of every training example it sees."""

    def __init__(self):
        self.seen: list[str] = []
        self.recording = True

    def __call__(self, examples):
        if self.recording:
            self.seen.extend(e["sid"] for e in examples if "sid" in e)
        return {
            key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "attention_mask", "labels")
        }


def tiny_model(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)
