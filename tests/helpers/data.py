"""Token data for tests: random causal-LM batches, and a toy pre-training set-up.

:func:`token_batches` / :func:`named_batches` give random batches with prompts and padding. The
toy set-up is one where the right mixture is obvious, for Trainer-level tests.

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
IGNORE_INDEX = -100


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
