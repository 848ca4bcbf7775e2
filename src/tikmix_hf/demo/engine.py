"""The demo's engine: train one arm for one seed and score it, and run every arm for every seed.

Every arm trains a fresh copy of the same initial model (same seed, same data order until a
mixture changes) for the same number of optimizer steps of the same batch of packed blocks, so
every arm trains on exactly the same number of tokens. The tokens TiKMiX reads to measure
influence (probe and validation sequences) are extra forward and backward passes, not training;
they are reported separately, as is the time they take.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import numpy as np

if TYPE_CHECKING:
    import torch

from .._io import save_json_atomic, save_text_atomic
from ..stage_record import measurement_tokens
from .arms import ARMS, DEFAULT_ARMS, Arm
from .data import DemoData, prepare_data
from .evaluation import accuracy_metric, held_out_losses
from .report import demo_report, demo_tables
from .results import RESULTS_FORMAT, draw_results, summarize
from .sizes import SIZES, DemoSize


def train_arm(arm: str | Arm, seed: int, data: DemoData, size: DemoSize, base: str | os.PathLike, *,
              show_progress: bool = False, metric: Any = None, reference_model: torch.nn.Module | None = None,
              keep_model: bool = False) -> dict | tuple[dict, torch.nn.Module]:
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

    from ..callback import TiKMiXCallback
    from ..config import TiKMiXConfig
    from ..history import load_history
    from ..mixture import DomainMixture
    from ..testing import tiny_llama
    from .callbacks import ArmProgress, HeldOutEvaluator
    from .corpora import choice_predictions

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
            from ..mixers import DoReMiMixer

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
    # the decisions' seconds, and the aligned start's counting before step 0
    tikmix_seconds = sum(s["seconds"]["total"] for s in stages) + ((history or {}).get("alignment") or {}).get(
        "seconds", 0.0)
    train_seconds = wall - evaluator.seconds
    probe_tokens = sum(measurement_tokens(s["influence"]) for s in stages if s.get("influence"))
    lookahead_tokens = sum(s["mixer"].get("lookahead_tokens", 0) for s in stages if s.get("mixer"))
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
        "training_tokens": int(sum(v["tokens"] or 0 for v in drawn.values())),  # known: the demo's rows carry ids
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
        "history": str(history_path.relative_to(base)) if history_path is not None else None,
        "warnings": messages,
    }, model



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
    arms: Sequence[str] = DEFAULT_ARMS,
    *,
    size: str | DemoSize | None = None,
    threads: int | None = 1,
    show_progress: bool = True,
    plots: bool = True,
    stream: TextIO | None = None,
) -> dict:
    """Train every arm for every seed, then write ``results.json``, ``report.md`` and the PNGs.

    Args:
        corpus: ``"local"`` (real text found on this machine) or ``"synthetic"`` (known roles).
        quick: the ``"quick"`` size preset instead of ``"default"``; docs/demo.md gives their measured times.
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
        metric = accuracy_metric()
        runs = []
        for seed in seeds:
            for arm in arms:
                row = train_arm(arm, seed, data, preset, out, show_progress=show_progress, metric=metric)
                runs.append(cast(dict, row))  # the row alone: keep_model is off
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
        "summary": summarize(runs, arms, baseline),
        "seconds": {"data": data.seconds, "total": time.perf_counter() - started,
                    "cpu": time.process_time() - cpu_started},
        "plots": [],
    }
    if plots:
        results["plots"] = [str(p.relative_to(out)) for p in draw_results(results, out / "plots", base=out)]
    save_json_atomic(out / "results.json", results)
    save_text_atomic(out / "report.md", demo_report(results))
    say()
    say(demo_tables(results))
    say(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} pictures in {out / 'plots'}")
    return results
