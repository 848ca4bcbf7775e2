"""The main job: TiKMiX against a static mixture on an embedded corpus, at equal training tokens.

:func:`run_demo` builds a corpus with no network (:mod:`tikmix_hf.corpora`), trains a BPE
tokenizer on it, packs fixed-length blocks per domain, and carves held-out text out of a few
target domains. From that text come the validation tasks:

- one held-out-text task per target domain (loss: mean token cross-entropy), and
- one downstream-style task, "which of 4 continuations is the real one" on held-out text of
  another target domain (its TiKMiX loss is the cross-entropy of the true continuation after the
  prefix; it is reported as accuracy, scored by the ``choice_accuracy`` ``evaluate`` module
  shipped in the package).

The held-out documents of each target are split in two disjoint halves: TiKMiX measures influence
on one (``validation``), the numbers in the report come from the other (``test``), so no arm is
scored on text its mixer looked at.

Then every arm trains a fresh copy of the same initial model (same seed, same data order until a
mixture changes) for the same number of optimizer steps of the same batch of packed blocks, so
every arm trains on exactly the same number of tokens:

- ``static`` (or ``natural``): the natural mixture (token proportions), never changed;
- ``uniform``: equal weights, never changed;
- ``tikmix_d`` / ``tikmix_m``: the natural mixture re-decided by :class:`~tikmix_hf.TiKMiXCallback`
  (TiKMiX-D or TiKMiX-M) at fixed fractions of training.

The tokens TiKMiX reads to measure influence (probe and validation sequences) are extra forward
and backward passes, not training; they are reported separately, as is the time they take.

Outputs in ``output_dir``: ``results.json`` (every number), ``report.md`` (the tables),
``plots/*.png`` (validation curves per seed, weights over training and the influence heatmap of
every stage per TiKMiX run) and ``runs/seed<s>/<arm>/tikmix/history.json``.

Example::

    from tikmix_hf.demo import run_demo
    results = run_demo(corpus="synthetic", quick=True, output_dir="demo-out")
    print(results["summary"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import save_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["ARMS", "SIZES", "Arm", "DemoSize", "held_out_losses", "prepare_data", "run_demo", "train_arm"]

RESULTS_FORMAT = "tikmix_hf.demo/1"

@dataclass(frozen=True)
class Arm:
    """One way of mixing, trained and scored like every other arm.

    ``initial`` is the mixture at step 0: ``"natural"``, ``"uniform"`` or explicit weights per
    domain. ``solver`` is ``None`` for a static mixture, else a ``tikmix_solver`` value that
    :class:`~tikmix_hf.TiKMiXCallback` runs at the stage boundaries, with ``config`` holding any
    further ``TiKMiXConfig`` fields (e.g. ``{"tikmix_shrink_z": 1.0}``).
    """

    name: str
    label: str
    initial: str | Mapping[str, float] = "natural"
    solver: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("static", "static (natural)"),
        Arm("natural", "static (natural)"),
        Arm("uniform", "static (uniform)", initial="uniform"),
        Arm("tikmix_d", "TiKMiX-D", solver="direct"),
        Arm("tikmix_m", "TiKMiX-M", solver="surrogate"),
    )
}
ARM_LABELS = {name: arm.label for name, arm in ARMS.items()}

# Target domains of the local corpus, by preference (the first present is used). The held-out
# text tasks: Python prose and asyncio code; the continuation-choice task: Bible chapters (with the
# Debian extras) or standard-library docstrings (standard library only).
LOCAL_TEXT_TARGETS = (("code/asyncio",), ("python/pydoc-topics", "python/docs-rst"))
LOCAL_CHOICE_TARGETS = ("bible/kjv", "python/docstrings")
HOLDOUT_FRACTION = 0.1
CHOICE_CONT_TOKENS = 8


@dataclass(frozen=True)
class DemoSize:
    """How big one demo run is. ``SIZES`` holds the presets; times are for 2 busy CPU cores."""

    name: str
    max_chars_per_domain: int  # local corpus: characters read per domain
    synthetic_docs: int  # synthetic corpus: documents per domain
    vocab_size: int
    block_size: int
    hidden_size: int
    layers: int
    heads: int
    batch_size: int
    max_steps: int
    learning_rate: float
    eval_every: int  # steps between held-out evaluations
    test_blocks: int  # reported held-out blocks per text task
    choice_items: int  # reported continuation-choice items
    validation_sequences: int  # TiKMiX validation sequences per task
    probe_sequences: int  # TiKMiX probe sequences per domain and stage
    surrogate_candidates: int  # TiKMiX-M look-ahead evaluations per stage
    stage_fractions: tuple[float, ...]
    all_domain_blocks: int  # held-out blocks per domain for the all-domains loss


SIZES: dict[str, DemoSize] = {
    "default": DemoSize(
        name="default", max_chars_per_domain=400_000, synthetic_docs=300, vocab_size=1024, block_size=128,
        hidden_size=96, layers=3, heads=4, batch_size=16, max_steps=1000, learning_rate=3e-3, eval_every=100,
        test_blocks=32, choice_items=120, validation_sequences=32, probe_sequences=16, surrogate_candidates=48,
        stage_fractions=(0.2, 0.4, 0.6, 0.8), all_domain_blocks=8,
    ),
    "quick": DemoSize(
        name="quick", max_chars_per_domain=120_000, synthetic_docs=150, vocab_size=768, block_size=64,
        hidden_size=64, layers=2, heads=4, batch_size=16, max_steps=240, learning_rate=3e-3, eval_every=40,
        test_blocks=32, choice_items=100, validation_sequences=24, probe_sequences=8, surrogate_candidates=16,
        stage_fractions=(1 / 3, 2 / 3), all_domain_blocks=4,
    ),
    # For tests: every code path, in seconds; the numbers mean nothing.
    "tiny": DemoSize(
        name="tiny", max_chars_per_domain=80_000, synthetic_docs=40, vocab_size=300, block_size=32,
        hidden_size=32, layers=1, heads=2, batch_size=8, max_steps=24, learning_rate=3e-3, eval_every=8,
        test_blocks=8, choice_items=16, validation_sequences=8, probe_sequences=4, surrogate_candidates=16,
        stage_fractions=(0.5,), all_domain_blocks=2,
    ),
}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

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
    from . import corpora as C

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
        synth = C.synthetic_corpus(seed=data_seed, n_docs=size.synthetic_docs, n_val_docs=max(20, size.synthetic_docs // 4))
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

    tokenizer = C.train_tokenizer(train, vocab_size=size.vocab_size, seed=data_seed)
    B = size.block_size
    domains = {d: C.pack_blocks(docs, tokenizer, B) for d, docs in train.items()}
    empty = [d for d, blocks in domains.items() if len(blocks) == 0]
    if empty:
        raise RuntimeError(f"domains {empty} have less text than one block of {B} tokens")

    validation: dict[str, Any] = {}
    test: dict[str, list[dict]] = {}
    for task, (val_docs, test_docs) in target_text.items():
        val_blocks, test_blocks = C.pack_blocks(val_docs, tokenizer, B), C.pack_blocks(test_docs, tokenizer, B)
        if len(val_blocks) == 0 or len(test_blocks) == 0:
            raise RuntimeError(f"task {task}: its held-out text is shorter than one block of {B} tokens")
        validation[task] = val_blocks
        test[task] = _rows(test_blocks.select(range(min(size.test_blocks, len(test_blocks)))))
    prefix = min(32, B - CHOICE_CONT_TOKENS)
    item_args = dict(n_choices=4, prefix_tokens=prefix, cont_tokens=CHOICE_CONT_TOKENS)
    validation[choice_task] = _gold_examples(
        C.continuation_choice_items(choice_val, tokenizer, n_items=size.validation_sequences * 2, seed=data_seed,
                                    **item_args)
    )
    choice_items = C.continuation_choice_items(choice_test, tokenizer, n_items=size.choice_items,
                                               seed=data_seed + 1, **item_args)
    test[choice_task] = _gold_examples(choice_items)
    heldout_all = {}
    for d, docs in held.items():
        blocks = C.pack_blocks(docs, tokenizer, B)
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


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

def held_out_losses(model, sets: Mapping[str, Sequence[Mapping]], batch_size: int = 32) -> dict[str, float]:
    """Mean token cross-entropy of each set over all its labelled tokens (forward passes only)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for name, examples in sets.items():
                total, count = 0.0, 0
                for lo in range(0, len(examples), batch_size):
                    chunk = examples[lo : lo + batch_size]
                    batch = {k: torch.tensor([e[k] for e in chunk], device=device)
                             for k in ("input_ids", "attention_mask", "labels")}
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    loss = model(**batch).loss
                    total += float(loss) * n
                    count += n
                out[name] = total / max(count, 1)
    finally:
        model.train(was_training)
    return out


def _trainer_callbacks():
    """Built on first use: importing transformers costs seconds that ``import tikmix_hf.demo`` should not."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class HeldOutEvaluator(TrainerCallback):
        """Held-out losses and choice accuracy at step 0, every ``every`` steps and at the end."""

        def __init__(self, data: DemoData, every: int, progress=None):
            self.data, self.every, self.progress = data, every, progress
            self.curve: list[dict] = []
            self.seconds = 0.0

        def measure(self, model, step: int) -> None:
            from .corpora import choice_predictions

            started = time.perf_counter()
            losses = held_out_losses(model, self.data.test)
            labels = np.array([it["label"] for it in self.data.choice_items])
            accuracy = float(np.mean(choice_predictions(model, self.data.choice_items) == labels))
            self.curve.append({"step": step, "losses": losses, "average": float(np.mean(list(losses.values()))),
                               "accuracy": accuracy})
            self.seconds += time.perf_counter() - started
            if self.progress is not None:
                self.progress.note(val=f"{self.curve[-1]['average']:.3f}")

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self.measure(model, state.global_step)

    class ArmProgress(TrainerCallback):
        """One tqdm bar per arm, with the training loss, the last held-out average and the TiKMiX stage."""

        def __init__(self, desc: str, disable: bool):
            self.desc, self.disable, self.bar, self.postfix = desc, disable, None, {}

        def note(self, **values) -> None:
            self.postfix.update(values)
            if self.bar is not None:
                self.bar.set_postfix(self.postfix, refresh=False)

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", disable=self.disable,
                            dynamic_ncols=True, leave=True)
            self.note()

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.note(loss=f"{logs['loss']:.3f}")
            if "tikmix/stage" in logs:
                self.note(stage=int(logs["tikmix/stage"]))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return HeldOutEvaluator, ArmProgress


# ------------------------------------------------------------------------------------------------
# One arm
# ------------------------------------------------------------------------------------------------

def train_arm(arm: str | Arm, seed: int, data: DemoData, size: DemoSize, base: str | os.PathLike, *,
              show_progress: bool = False, metric=None, reference_model=None, keep_model: bool = False):
    """Train one arm for one seed on ``data`` and score it; the row :func:`run_demo` reports.

    ``arm`` is a name of :data:`ARMS` or an :class:`Arm`. ``reference_model`` is handed to the
    DoReMi mixer (``solver="doremi"``). With ``keep_model=True`` the trained model is returned
    too, as ``(row, model)``.
    """
    row, model = _train_arm(ARMS[arm] if isinstance(arm, str) else arm, seed, data, size, Path(base),
                            show_progress=show_progress, metric=metric, reference_model=reference_model)
    return (row, model) if keep_model else row


def _train_arm(arm: Arm, seed: int, data: DemoData, size: DemoSize, base: Path, *, show_progress: bool,
               metric=None, reference_model=None) -> tuple[dict, Any]:
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .callback import TiKMiXCallback
    from .history import load_history
    from .config import TiKMiXConfig
    from .corpora import choice_predictions, tiny_llama
    from .mixture import DomainMixture

    initial, solver = arm.initial, arm.solver
    run_dir = base / "runs" / f"seed{seed}" / arm.name
    tok = data.tokenizer
    model = tiny_llama(len(tok), hidden_size=size.hidden_size, layers=size.layers, heads=size.heads,
                       block_size=size.block_size, seed=seed, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    mixture = DomainMixture(data.domains, weights=dict(initial) if isinstance(initial, Mapping) else initial,
                            seed=seed)
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=size.max_steps, per_device_train_batch_size=size.batch_size,
        learning_rate=size.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, size.max_steps // 20),
        weight_decay=0.1, adam_beta2=0.98, max_grad_norm=1.0, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=max(1, size.eval_every // 2), disable_tqdm=True, seed=seed, data_seed=seed,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    HeldOutEvaluator, ArmProgress = _trainer_callbacks()
    progress = ArmProgress(f"seed {seed} {arm.label:<16}", disable=not show_progress)
    evaluator = HeldOutEvaluator(data, size.eval_every, progress)
    callbacks: list = [evaluator, progress]
    tikmix = None
    if solver is not None:
        fields = dict(
            tikmix_solver=solver, tikmix_stage_fractions=list(size.stage_fractions),
            tikmix_probe_sequences=size.probe_sequences, tikmix_validation_sequences=size.validation_sequences,
            tikmix_preconditioner="adam", tikmix_surrogate_candidates=size.surrogate_candidates, tikmix_seed=seed,
            tikmix_show_progress=False, tikmix_log_matrix=False,
        )
        config = TiKMiXConfig(**{**fields, **dict(arm.config)})  # the arm's own fields win
        tikmix = TiKMiXCallback(mixture, data.validation, config, collator=default_data_collator)
        if reference_model is not None:
            from .mixers import DoReMiMixer

            if solver != "doremi":
                raise ValueError(f"reference_model is for solver='doremi'; arm {arm.name!r} uses {solver!r}")
            tikmix.mixer = DoReMiMixer(reference_model=reference_model)
        callbacks.insert(0, tikmix)
    trainer = Trainer(model=model, args=args, train_dataset=mixture, data_collator=default_data_collator,
                      callbacks=callbacks)
    if tikmix is not None:
        tikmix.bind(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started, cpu_started = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    losses = evaluator.curve[-1]["losses"]
    predictions = choice_predictions(model, data.choice_items)
    labels = [it["label"] for it in data.choice_items]
    if metric is not None:
        accuracy = float(metric.compute(predictions=predictions.tolist(), references=labels)["accuracy"])
    else:
        accuracy = float(np.mean(predictions == np.array(labels)))
    all_domains = held_out_losses(model, data.heldout_all)
    consumed = size.max_steps * size.batch_size
    drawn = mixture.drawn(consumed)
    history = history_path = None
    stages: list[dict] = []
    if tikmix is not None:
        history_path = run_dir / "tikmix" / "history.json"
        history = load_history(history_path)
        stages = history["stages"]
    tikmix_seconds = sum(s["seconds"]["total"] for s in stages)
    train_seconds = wall - evaluator.seconds
    probe_tokens = sum(
        sum(s["influence"]["domain_tokens"].values()) + sum(s["influence"]["task_tokens"].values())
        for s in stages if s.get("influence")
    )
    lookahead_tokens = sum(
        (s["solver_result"]["details"].get("n_evaluated", 0) + 1) * sum(s["influence"]["task_tokens"].values())
        for s in stages if s.get("solver_result") and s.get("influence") and s["solver"] == "surrogate"
    )
    messages = sorted({str(w.message) for w in caught if "TiKMiX" in str(w.message)})
    return {
        "seed": seed,
        "arm": arm.name,
        "label": arm.label,
        "final": {
            "losses": losses,
            "average": float(np.mean(list(losses.values()))),
            "accuracy": accuracy,
            "all_domains_loss": float(np.mean(list(all_domains.values()))),
            "all_domains": all_domains,
        },
        "curve": evaluator.curve,
        "training_tokens": int(sum(v["tokens"] for v in drawn.values())),
        "training_samples": consumed,
        "drawn": {d: v["examples"] for d, v in drawn.items()},
        "probe_tokens": int(probe_tokens),
        "lookahead_forward_tokens": int(lookahead_tokens),
        # cpu: CPU time of this process (all its threads); on an idle machine with one thread it is the wall time.
        "seconds": {"wall": wall, "cpu": cpu, "eval": evaluator.seconds, "train": train_seconds,
                    "tikmix": tikmix_seconds},
        "tikmix_share": tikmix_seconds / train_seconds if train_seconds > 0 else 0.0,
        "final_weights": mixture.weights,
        "stages": len(stages),
        "history": str(history_path.relative_to(base)) if history is not None else None,
        "warnings": messages,
    }, model


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------

def _summary(runs: list[dict], arms: Sequence[str], baseline: str | None) -> dict:
    """Per arm: mean and spread over seeds; per seed: the difference to the baseline arm."""
    by = {(r["seed"], r["arm"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {"baseline": baseline, "arms": {}}
    for arm in arms:
        rows = [by[(s, arm)] for s in seeds if (s, arm) in by]
        avg = np.array([r["final"]["average"] for r in rows])
        entry = {
            "label": rows[0]["label"],
            "seeds": [r["seed"] for r in rows],
            "average_loss_mean": float(avg.mean()),
            "average_loss_std": float(avg.std(ddof=1)) if len(avg) > 1 else 0.0,
            "accuracy_mean": float(np.mean([r["final"]["accuracy"] for r in rows])),
            "all_domains_loss_mean": float(np.mean([r["final"]["all_domains_loss"] for r in rows])),
            "task_loss_mean": {
                t: float(np.mean([r["final"]["losses"][t] for r in rows])) for t in rows[0]["final"]["losses"]
            },
            "train_seconds_mean": float(np.mean([r["seconds"]["train"] for r in rows])),
            "tikmix_share_mean": float(np.mean([r["tikmix_share"] for r in rows])),
        }
        if baseline is not None and arm != baseline:
            deltas = [by[(s, arm)]["final"]["average"] - by[(s, baseline)]["final"]["average"]
                      for s in seeds if (s, arm) in by and (s, baseline) in by]
            entry["delta_vs_baseline"] = deltas
            entry["delta_mean"] = float(np.mean(deltas)) if deltas else None
            entry["wins"] = int(sum(d < 0 for d in deltas))
        out["arms"][arm] = entry
    return out


def _check_arms(arms: Sequence[str]) -> list[str]:
    arms = list(arms)
    if not arms:
        raise ValueError("arms is empty: give at least one of " + ", ".join(ARMS))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}: use any of {list(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms {arms} name an arm twice")
    return arms


def run_demo(
    corpus: str = "local",
    quick: bool = False,
    output_dir: str | os.PathLike = "tikmix-demo",
    seeds: Sequence[int] = (0,),
    arms: Sequence[str] = ("static", "tikmix_d", "tikmix_m"),
    *,
    size: str | DemoSize | None = None,
    threads: int | None = 1,
    show_progress: bool = True,
    plots: bool = True,
    stream=None,
) -> dict:
    """Train every arm for every seed, then write ``results.json``, ``report.md`` and the PNGs.

    Args:
        corpus: ``"local"`` (real text found on this machine) or ``"synthetic"`` (known roles).
        quick: the ``"quick"`` size preset (about 2 minutes) instead of ``"default"`` (about 10).
        output_dir: where everything is written (created).
        seeds: model seeds; each seeds the initial model, the sample stream and the probes. The
            corpus, split and tasks are the same for every seed.
        arms: any of :data:`ARMS`; the first static arm is the baseline of the comparison.
        size: a preset name of :data:`SIZES` or a :class:`DemoSize` (overrides ``quick``).
        threads: torch intra-op threads while the demo runs (restored afterwards). One is the
            default: these models are too small to gain from more, and on a shared machine extra
            OpenMP threads that wait for busy cores slow a step down many times over.
        show_progress: tqdm bars (one per arm) on stderr.
        plots: write the PNGs.
        stream: where the progress lines and the final tables are printed (default ``sys.stdout``).

    Returns:
        The ``results.json`` document.
    """
    import torch

    from . import report as R

    arms = _check_arms(arms)
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give distinct non-negative integers, e.g. 0 1 2")
    if isinstance(size, DemoSize):
        preset = size
    else:
        name = size or ("quick" if quick else "default")
        if name not in SIZES:
            raise ValueError(f"size={name!r}: use one of {list(SIZES)}")
        preset = SIZES[name]
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: give a positive number of threads")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stdout if stream is None else stream
    baseline = next((a for a in arms if ARMS[a].solver is None), None)

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    from transformers.utils import logging as hf_logging

    previous_threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()  # the Trainer's notices would break the progress bars
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        say(f"TiKMiX demo: corpus={corpus}, size={preset.name}, seeds={seeds}, arms={arms}, output={out}")
        data = prepare_data(corpus, preset)
        say(f"data ready in {data.seconds:.1f} s: {len(data.domains)} domains, "
            f"{sum(r['train_blocks'] for r in data.domain_rows)} training blocks of {preset.block_size} tokens, "
            f"tasks {list(data.validation)}")
        metric = _load_metric()
        runs = []
        for seed in seeds:
            for arm in arms:
                runs.append(train_arm(arm, seed, data, preset, out, show_progress=show_progress, metric=metric))
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(verbosity)

    results = {
        "format": RESULTS_FORMAT,
        "corpus": corpus,
        "size": dataclasses.asdict(preset),
        "seeds": seeds,
        "arms": arms,
        "baseline": baseline,
        "threads": threads,
        "domains": data.domain_rows,
        "tasks": {t: data.task_sources[t] for t in data.validation},
        "choice_task": data.choice_task,
        "test_sizes": {t: len(v) for t, v in data.test.items()},
        "roles": data.roles,
        "oracle_weights": data.oracle_weights,
        "training_tokens_per_arm": runs[0]["training_tokens"],
        "runs": runs,
        "summary": _summary(runs, arms, baseline),
        "seconds": {"data": data.seconds, "total": time.perf_counter() - started,
                    "cpu": time.process_time() - cpu_started},
        "plots": [],
    }
    if plots:
        results["plots"] = [str(p.relative_to(out)) for p in draw_results(results, out / "plots", base=out)]
    save_json_atomic(out / "results.json", results)
    (out / "report.md").write_text(R.demo_report(results))
    say()
    say(R.demo_tables(results))
    say(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} pictures in {out / 'plots'}")
    return results


def _load_metric():
    """The shipped ``choice_accuracy`` evaluate module, or ``None`` when ``evaluate`` is not installed."""
    try:
        from .corpora import load_metric

        return load_metric()
    except ImportError:
        logger.info("evaluate is not installed: accuracy is computed with numpy")
        return None


def draw_results(results: Mapping[str, Any], plot_dir: str | os.PathLike, *, base: str | os.PathLike) -> list[Path]:
    """The demo's pictures from its ``results.json`` document and the run histories it names
    (paths relative to ``base``, the folder of ``results.json``)."""
    from . import plots as P
    from .history import load_history

    paths: list[Path] = []
    plot_dir = Path(plot_dir)
    size = results["size"]
    for seed in results["seeds"]:
        runs = [r for r in results["runs"] if r["seed"] == seed]
        curves = {r["label"]: {t: [(c["step"], c["losses"][t]) for c in r["curve"]] for t in r["final"]["losses"]}
                  for r in runs}
        accuracy = {r["label"]: [(c["step"], c["accuracy"]) for c in r["curve"]] for r in runs}
        paths.append(P.plot_validation_curves(
            curves, plot_dir / f"validation_seed{seed}.png", accuracy=accuracy,
            title=f"Held-out validation, {results['corpus']} corpus, seed {seed} "
                  f"(equal training tokens: {results['training_tokens_per_arm']:,})",
        ))
        for r in runs:
            if r["history"] is None:
                continue
            history = load_history(Path(base) / r["history"])
            paths.extend(P.plot_history(
                history, plot_dir, prefix=f"seed{seed}_{r['arm']}_", total_steps=size["max_steps"],
                title=f"{r['label']} mixture over training, {results['corpus']} corpus, seed {seed}",
            ))
    return paths


def load_results(path: str | os.PathLike) -> dict:
    """Read a demo ``results.json``."""
    with open(path) as fh:
        doc = json.load(fh)
    if doc.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a tikmix demo results file (expected format {RESULTS_FORMAT!r})")
    return doc

