"""Tokenizers, packing and held-out splits: the plumbing between raw text and training blocks.

:func:`train_tokenizer` (byte-level BPE in about a second), :func:`byte_tokenizer` (the
fallback), :func:`pack_blocks` and :func:`holdout_split`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets
    import transformers

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


def holdout_split(
    corpus: Mapping[str, Sequence[str]], fraction: float, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Carve ``fraction`` of each domain's documents out as held-out (validation) text.

    Returns ``(train, holdout)`` with the same domain names. Per domain, ``round(fraction * n)``
    documents (at least one when ``fraction > 0`` and the domain has two or more) are chosen
    with a generator seeded by ``seed`` and the domain name; both sides keep the original
    document order. Training documents whose text equals any held-out document (of any domain)
    are dropped, so held-out text never appears verbatim in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    holdout: dict[str, list[str]] = {}
    chosen: dict[str, set[int]] = {}
    for name, docs in corpus.items():
        n = len(docs)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        picked = set(random.Random(f"{seed}:{name}").sample(range(n), k))
        chosen[name] = picked
        holdout[name] = [doc for i, doc in enumerate(docs) if i in picked]
    held_text = {doc for docs in holdout.values() for doc in docs}
    train = {
        name: [doc for i, doc in enumerate(docs) if i not in chosen[name] and doc not in held_text]
        for name, docs in corpus.items()
    }
    return train, holdout
