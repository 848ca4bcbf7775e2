"""Small things to train and measure on: tiny Llamas, token data, tokenizers and packed text.

What the tests, the benchmarks, the notebooks, the demo and ``tikmix train`` build their models
and data from, in the spirit of accelerate's ``test_utils``. Everything is built from configs and
code: no download, no hub, the same seed gives the same weights and the same data.

- Models: :func:`tiny_llama`, the one small Llama, of any size; :func:`exact_llama` (the model of
  the brute-force checks, exact to fp64 rounding) and :func:`toy_model` (the model of the toy set-up)
  are two sizes of it.
- Token data: :func:`token_batches` and :func:`named_batches` (random causal-LM batches with prompts
  and padding), and a toy pre-training set-up where the right mixture is obvious:
  :func:`toy_domains`, :func:`toy_validation` and the :class:`RecordingCollator`.
- Text: :func:`train_tokenizer` (byte-level BPE in about a second), :func:`byte_tokenizer` (the
  fallback), :func:`encode` and :func:`pack_blocks` (documents to fixed-length training blocks).

Example::

    from tikmix_hf.testing import pack_blocks, tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(["some text", "more text"], vocab_size=300)
    blocks = pack_blocks(["some text " * 100], tokenizer, block_size=32)
    model = tiny_llama(len(tokenizer), hidden_size=32, layers=2, block_size=32)

transformers, datasets and tokenizers are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._loss import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets
    import transformers

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TOY_SEQ",
    "TOY_VOCAB",
    "RecordingCollator",
    "byte_tokenizer",
    "encode",
    "exact_llama",
    "named_batches",
    "pack_blocks",
    "tiny_llama",
    "token_batches",
    "toy_domains",
    "toy_model",
    "toy_validation",
    "train_tokenizer",
]

# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    block_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> transformers.LlamaForCausalLM:
    """A small ``LlamaForCausalLM`` built from a config (no download), its weights drawn from ``seed``.

    Defaults give about 0.9M parameters at ``vocab_size=1024``: tied embeddings, SwiGLU width
    ``8/3 * hidden_size`` rounded up to a multiple of 16, SDPA attention, ``block_size`` positions.
    Pass token ids (``pad_token_id=``, ``eos_token_id=``, ``bos_token_id=``) or any other
    ``LlamaConfig`` field (``intermediate_size=``, ``tie_word_embeddings=``, ``attention_dropout=``)
    through ``config_overrides``. The global torch RNG is left untouched.

    With ``dtype=torch.float64`` the RMSNorm layers are switched to one that computes in float64:
    Hugging Face's Llama norm computes in float32 whatever the model dtype, which puts ~1e-8 relative
    noise into gradients (enough to break 1e-10 brute-force comparisons whenever two computations
    scale a loss differently). With that switch, and SDPA attention (eager attention also has a
    float32 softmax), the model is exact to fp64 rounding. Other dtypes convert the model as built.
    """
    import transformers

    if hidden_size % heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by heads={heads}")
    settings: dict[str, Any] = dict(
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
    if dtype is not None:
        # transformers wraps to() in functools.wraps(nn.Module.to), whose type mypy reads as the unbound method.
        model = model.to(dtype)  # type: ignore[arg-type]
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


def exact_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **config_overrides: Any):
    """The model of the brute-force checks: a 2-layer :func:`tiny_llama` of about 7k parameters.

    Vocabulary 64 (the range of :func:`token_batches`), width 16, MLP width 32, 32 positions, untied
    embeddings (every parameter has one gradient path); at the default float64, exact to fp64 rounding.
    """
    overrides = {"intermediate_size": 32, "tie_word_embeddings": False, **config_overrides}
    return tiny_llama(64, hidden_size=16, layers=2, heads=2, block_size=32, seed=seed, dtype=dtype, **overrides)


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model of the toy set-up (:func:`toy_domains`): vocabulary 64, 16 positions, width 32, untied."""
    return tiny_llama(TOY_VOCAB, hidden_size=32, layers=2, heads=2, block_size=TOY_SEQ, seed=seed, dtype=dtype,
                      intermediate_size=64, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# Token data
# ------------------------------------------------------------------------------------------------


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


def named_batches(names: Iterable[str], n_batches: int = 2, *, seed: int = 0, vocab_size: int = 64, **kwargs):
    """``{name: token_batches(...)}`` with a different seed and token range per name."""
    out = {}
    width = max(8, vocab_size // 2)
    for index, name in enumerate(names):
        low = (index * 7) % (vocab_size - width + 1)
        out[name] = token_batches(
            n_batches, seed=seed * 1000 + index, vocab_size=vocab_size, low=low, high=low + width, **kwargs
        )
    return out


#: Sequence length and vocabulary of the toy set-up.
TOY_SEQ = 16
TOY_VOCAB = 64


def _toy_examples(domain: str, seqs) -> list[dict]:
    return [
        {"input_ids": s, "attention_mask": [1] * TOY_SEQ, "labels": s, "sid": f"{domain}:{i}"}
        for i, s in enumerate(seqs)
    ]


def _counting(rng, n):
    starts = rng.integers(0, 32, size=n)
    return [((s + np.arange(TOY_SEQ)) % 32).tolist() for s in starts]


def toy_domains(n: int = 256, seed: int = 0) -> dict[str, list[dict]]:
    """A toy pre-training set-up where the right mixture is obvious, for Trainer-level checks.

    Three domains of ``n`` examples (vocabulary 64, sequences of 16 tokens, each with a ``sid`` such
    as ``"pattern:3"`` that :class:`RecordingCollator` records):

    - ``pattern``: counting sequences ``t, t+1, t+2, ... (mod 32)`` from a random start;
    - ``echo``: a random half-sequence over tokens 0-31 repeated twice;
    - ``noise``: uniform random tokens 32-63.

    The validation task of :func:`toy_validation` is fresh counting sequences, so up-weighting
    ``pattern`` is what lowers its loss and ``noise`` can only hurt it.
    """
    rng = np.random.default_rng(seed)
    pattern = _counting(rng, n)
    echo = []
    for _ in range(n):
        half = rng.integers(0, 32, size=TOY_SEQ // 2)
        echo.append(np.concatenate([half, half]).tolist())
    noise = rng.integers(32, 64, size=(n, TOY_SEQ)).tolist()
    return {"pattern": _toy_examples("pattern", pattern), "echo": _toy_examples("echo", echo),
            "noise": _toy_examples("noise", noise)}


def toy_validation(n: int = 32, seed: int = 1) -> dict[str, list[dict]]:
    """The validation task of the toy set-up: ``held_out_pattern``, fresh counting sequences."""
    return {"held_out_pattern": _toy_examples("val", _counting(np.random.default_rng(seed), n))}


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


# ------------------------------------------------------------------------------------------------
# Text: tokenizers and packing
# ------------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def _flatten(texts: Mapping[str, Sequence[str]] | Iterable[str]) -> list[str]:
    if isinstance(texts, Mapping):
        return [doc for name in sorted(texts) for doc in texts[name]]
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single str")
    return list(texts)


def train_tokenizer(
    texts: Mapping[str, Sequence[str]] | Iterable[str],
    vocab_size: int = 1024,
    seed: int = 0,
    *,
    max_chars: int = 2_000_000,
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (about a second for a few MB).

    ``texts`` is an iterable of documents or a corpus dict (all domains, in sorted order).
    When they hold more than ``max_chars`` characters, a subsample chosen by ``seed`` is used.
    Special tokens: ``<|endoftext|>`` (eos, id 0) and ``<pad>`` (pad, id 1). No token is added
    automatically when encoding; :func:`pack_blocks` appends eos between documents. Byte-level
    pre-tokenisation means every string round-trips through ``encode``/``decode``.
    """
    import tokenizers
    import transformers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes and 2 special tokens), got {vocab_size}")
    docs = _flatten(texts)
    if not docs:
        raise ValueError("train_tokenizer needs at least one document")
    if sum(map(len, docs)) > max_chars:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        kept, total = [], 0
        for i in order:
            if total >= max_chars:
                break
            kept.append(i)
            total += len(docs[i])
        docs = [docs[i] for i in sorted(kept)]
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def byte_tokenizer() -> transformers.ByT5Tokenizer:
    """The no-training fallback: ByT5's byte tokenizer (vocab 384, pad 0, eos 1).

    Note that it appends ``</s>`` when ``add_special_tokens`` is true (the default).
    """
    import transformers

    return transformers.ByT5Tokenizer()


def encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pack_blocks(texts: Sequence[str], tokenizer: Any, block_size: int) -> datasets.Dataset:
    """Tokenise documents, join them with eos, and cut fixed-length causal-LM blocks.

    Each document is followed by ``tokenizer.eos_token_id``; the stream is cut into
    ``len(stream) // block_size`` blocks and the remainder dropped. Columns: ``input_ids``,
    ``labels`` (equal to ``input_ids``; the model shifts them) and ``attention_mask`` (all
    ones). Deterministic: the same texts give the same rows in the same order.
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to join documents with")
    stream = np.fromiter(
        (t for ids in encode(texts, tokenizer) for t in (*ids, eos)), dtype=np.int64
    )
    n_blocks = len(stream) // block_size
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "labels": [list(b) for b in blocks],
         "attention_mask": [[1] * block_size for _ in blocks]},
        features=datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int64")),
            "labels": datasets.Sequence(datasets.Value("int64")),
            "attention_mask": datasets.Sequence(datasets.Value("int64")),
        }),
    )
