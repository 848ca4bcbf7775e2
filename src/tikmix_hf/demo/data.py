"""The demo's data: corpus, tokenizer, training blocks, and the validation and test sets."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..testing import pack_blocks, train_tokenizer
from . import corpora as C
from .sizes import DemoSize

# Target domains of the local corpus, by preference (the first present is used). The held-out
# text tasks: Python prose and asyncio code; the continuation-choice task: Bible chapters (with the
# Debian extras) or standard-library docstrings (standard library only).
LOCAL_TEXT_TARGETS = (("code/asyncio",), ("python/pydoc-topics", "python/docs-rst"))
LOCAL_CHOICE_TARGETS = ("bible/kjv", "python/docstrings")
HOLDOUT_FRACTION = 0.1
CHOICE_CONT_TOKENS = 8


@dataclass
class DemoData:
    """Everything the arms share: tokenizer, training blocks, validation and test sets."""

    corpus: str
    tokenizer: Any
    domains: dict[str, Any]  # domain -> datasets.Dataset of packed blocks
    validation: dict[str, Any]  # task -> examples TiKMiX measures influence on
    test: dict[str, list[dict]]  # task -> examples the reported losses come from
    choice_task: str
    choice_items: list[dict]  # reported accuracy items
    heldout_all: dict[str, list[dict]]  # domain -> held-out blocks (the all-domains loss)
    task_sources: dict[str, str]  # task -> where its text comes from
    domain_rows: list[dict]  # per domain: documents, characters, training blocks
    roles: dict[str, str] | None = None  # synthetic corpus only
    oracle_weights: dict[str, float] | None = None  # synthetic corpus only
    seconds: float = 0.0


def _pick(available: Sequence[str], preferences: Sequence[str], what: str, corpus: str) -> str:
    for name in preferences:
        if name in available:
            return name
    raise RuntimeError(
        f"the {corpus} corpus has none of the {what} domains {list(preferences)} (it has {list(available)}); "
        "run `sh scripts/install_corpora.sh` as root, or use --corpus synthetic"
    )


def _rows(blocks) -> list[dict]:
    return [dict(row) for row in blocks]


def _gold_examples(items: Sequence[Mapping]) -> list[dict]:
    """Choice items as causal-LM examples whose only labels are the true continuation."""
    out = []
    for item in items:
        prefix, gold = list(item["prefix_ids"]), list(item["choice_ids"][item["label"]])
        ids = prefix + gold
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prefix) + gold})
    return out


def prepare_data(corpus: str, size: DemoSize, *, data_seed: int = 0) -> DemoData:
    """Build the corpus, tokenizer, training blocks and the validation/test sets of the demo.

    ``data_seed`` fixes the corpus sample, the held-out split and the task items; it is the same
    for every model seed, so that every arm of every seed is scored on the same test text.
    """


    started = time.perf_counter()
    roles = oracle = None
    if corpus == "local":
        raw = C.local_corpus(max_chars_per_domain=size.max_chars_per_domain, seed=data_seed)
        if len(raw) < 3:
            raise RuntimeError(f"the local corpus has only {len(raw)} domains; use --corpus synthetic")
        train, held = C.holdout_split(raw, HOLDOUT_FRACTION, seed=data_seed)
        text_targets = [_pick(list(raw), prefs, "held-out text", corpus) for prefs in LOCAL_TEXT_TARGETS]
        choice_domain = _pick(list(raw), LOCAL_CHOICE_TARGETS, "continuation-choice", corpus)
        for d in [*text_targets, choice_domain]:
            if len(held[d]) < 2:
                raise RuntimeError(
                    f"target domain {d} has {len(raw[d])} documents, too few to hold out one for TiKMiX and one for "
                    f"the report; read more text per domain (max_chars_per_domain={size.max_chars_per_domain})"
                )
        # Each target's held-out documents: even positions for TiKMiX, odd ones for the report.
        target_text = {f"val:{d}": (held[d][0::2], held[d][1::2]) for d in text_targets}
        choice_val, choice_test = held[choice_domain][0::2], held[choice_domain][1::2]
        choice_task = f"choice:{choice_domain}"
        sources = {f"val:{d}": f"held-out documents of {d}" for d in text_targets}
        sources[choice_task] = f"4-way continuation choice on held-out documents of {choice_domain}"
    elif corpus == "synthetic":
        synth = C.synthetic_corpus(seed=data_seed, n_docs=size.synthetic_docs,
                                   n_val_docs=max(20, size.synthetic_docs // 4))
        raw = synth.domains
        train, held = C.holdout_split(raw, HOLDOUT_FRACTION, seed=data_seed)
        target_text = {f"val:{t}": (docs[0::2], docs[1::2]) for t, docs in synth.validation.items()}
        choice_val, choice_test = synth.validation["task_a"][0::2], synth.validation["task_a"][1::2]
        choice_task = "choice:task_a"
        sources = {f"val:{t}": f"held-out documents of language {t[-1].upper()}" for t in synth.validation}
        sources[choice_task] = "4-way continuation choice on held-out documents of language A"
        roles, oracle = dict(synth.roles), dict(synth.oracle_weights)
    else:
        raise ValueError(f"corpus={corpus!r}: use 'local' or 'synthetic'")

    tokenizer = train_tokenizer(train, vocab_size=size.vocab_size, seed=data_seed)
    B = size.block_size
    domains = {d: pack_blocks(docs, tokenizer, B) for d, docs in train.items()}
    empty = [d for d, blocks in domains.items() if len(blocks) == 0]
    if empty:
        raise RuntimeError(f"domains {empty} have less text than one block of {B} tokens")

    validation: dict[str, Any] = {}
    test: dict[str, list[dict]] = {}
    for task, (val_docs, test_docs) in target_text.items():
        val_blocks, test_blocks = pack_blocks(val_docs, tokenizer, B), pack_blocks(test_docs, tokenizer, B)
        if len(val_blocks) == 0 or len(test_blocks) == 0:
            raise RuntimeError(f"task {task}: its held-out text is shorter than one block of {B} tokens")
        validation[task] = val_blocks
        test[task] = _rows(test_blocks.select(range(min(size.test_blocks, len(test_blocks)))))
    prefix = min(32, B - CHOICE_CONT_TOKENS)
    item_args: dict[str, Any] = dict(n_choices=4, prefix_tokens=prefix, cont_tokens=CHOICE_CONT_TOKENS)
    validation[choice_task] = _gold_examples(
        C.continuation_choice_items(choice_val, tokenizer, n_items=size.validation_sequences * 2, seed=data_seed,
                                    **item_args)
    )
    choice_items = C.continuation_choice_items(choice_test, tokenizer, n_items=size.choice_items,
                                               seed=data_seed + 1, **item_args)
    test[choice_task] = _gold_examples(choice_items)
    heldout_all = {}
    for d, docs in held.items():
        blocks = pack_blocks(docs, tokenizer, B)
        if len(blocks):
            heldout_all[d] = _rows(blocks.select(range(min(size.all_domain_blocks, len(blocks)))))
    domain_rows = [
        {"domain": d, "documents": len(raw[d]), "characters": sum(map(len, raw[d])), "train_blocks": len(domains[d])}
        for d in domains
    ]
    return DemoData(
        corpus=corpus, tokenizer=tokenizer, domains=domains, validation=validation, test=test,
        choice_task=choice_task, choice_items=choice_items, heldout_all=heldout_all, task_sources=sources,
        domain_rows=domain_rows, roles=roles, oracle_weights=oracle, seconds=time.perf_counter() - started,
    )
