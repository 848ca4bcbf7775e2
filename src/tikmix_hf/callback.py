"""The thin adapter between ``transformers.Trainer`` and TiKMiX.

At each stage boundary (:mod:`tikmix_hf.stages`, decided in ``on_step_end`` from the global step or
the token count, values identical on every rank) the callback

1. draws probe examples of every domain from the mixture's probe stream and the fixed validation
   examples of every task, collated by the Trainer's own collator (:mod:`tikmix_hf.batching`); with
   the training window (:mod:`tikmix_hf.influence.window_lifecycle`) the training micro-batches of the
   steps before have been read instead, and probes only top up the domains it saw too little of;
2. hands them to the mixer (:mod:`tikmix_hf.mixers`, chosen by ``tikmix_solver``), which measures the
   Group Influence matrix (:mod:`tikmix_hf.influence`) and solves for the next mixture
   (:mod:`tikmix_hf.solvers`); nothing here computes influence or solves anything;
3. schedules the new weights on the mixture at a sample index past everything the data pipeline
   may already have drawn (:meth:`tikmix_hf.DomainMixture.set_weights`), identical on every rank;
4. appends the stage (:mod:`tikmix_hf.stage_record`) to ``<output_dir>/tikmix/history.json`` and logs
   ``tikmix/*`` metrics through ``Trainer.log``, so every ``report_to`` integration receives them.

Its checkpoint state is :class:`~tikmix_hf.callback_state.CallbackState`, JSON only.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from torch import nn, optim
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ._distributed import agree, collectives, measured_module, rank_and_world
from ._io import remove_stale_temporaries
from .aligned_start import starting_weights
from .batching import Batcher, check_validation, draw_probes, select_validation, with_general_task
from .callback_state import CallbackState
from .config import TiKMiXConfig
from .history import write_history
from .influence.window_lifecycle import WindowLifecycle
from .integrations_log import log_to_integrations
from .loader import LoaderGeometry
from .mixers import Mixer, StageInputs, build_mixer
from .mixture import DomainMixture
from .report import stage_line
from .run_checks import check_first_batches, check_trainer
from .setup_checks import check_window_setup
from .stage_record import StageRecord, StageSeconds, entropy, stage_metrics, stage_notes, start_metrics
from .stages import Stages, plan_stages, plan_windows
from .token_count import TokenCount
from .training_args import config_from

logger = logging.get_logger(__name__)
__all__ = ["TiKMiXCallback"]


class TiKMiXCallback(TrainerCallback, ExportableState):
    r"""Re-mix the training domains at stage boundaries from their Group Influence on validation tasks.

    Args:
        mixture: the :class:`~tikmix_hf.DomainMixture` that is the Trainer's ``train_dataset``.
        validation: task name -> dataset of tokenised examples with ``labels`` (a ``datasets.Dataset``,
            a list of dicts, ...). ``tikmix_validation_sequences`` examples per task, chosen once with
            ``tikmix_seed``, give each task's gradient at every stage.
        config: a :class:`~tikmix_hf.TiKMiXConfig` (or a :class:`~tikmix_hf.TiKMiXTrainingArguments`);
            defaults when ``None``.
        trainer: the Trainer to log through (or call :meth:`bind` later).
        collator: turns a list of examples into a model batch; default: the collator of the
            Trainer's training DataLoader.
        mixer: a :class:`~tikmix_hf.mixers.Mixer` to use instead of the one ``tikmix_solver`` names (a mixer
            of your own, with its own options).

    Example::

        mixture = DomainMixture({"code": code, "prose": prose, "noise": noise}, weights="natural")
        callback = TiKMiXCallback(mixture, {"held_out_code": val_code}, TiKMiXConfig(tikmix_stage_steps=500))
        trainer = Trainer(model=model, args=args, train_dataset=mixture, data_collator=collator,
                          callbacks=[callback])
        callback.bind(trainer)
        trainer.train()

    Binding to another Trainer (a notebook rerun, a sweep) replaces the first; a callback still bound
    to an earlier Trainer refuses to start, with the fix. Checkpoints hold its state (JSON only) and it
    restores itself in ``on_train_begin``; keep ``restore_callback_states_from_checkpoint=False``.
    ``ignore_data_skip=True`` makes a resume jump straight to the saved stream position instead of
    replaying the skipped batches.
    """

    def __init__(self, mixture: DomainMixture, validation: Mapping[str, Any], config: TiKMiXConfig | None = None, *,
                 trainer: Trainer | None = None, collator: Callable[[list], Mapping[str, Any]] | None = None,
                 mixer: Mixer | None = None) -> None:
        if not isinstance(mixture, DomainMixture):
            raise TypeError(
                f"mixture must be a tikmix_hf.DomainMixture, got {type(mixture).__name__}; wrap your domains with "
                "DomainMixture({name: dataset, ...}) and pass it as the Trainer's train_dataset too"
            )
        if mixer is not None and not isinstance(mixer, Mixer):
            raise TypeError(f"mixer must be a tikmix_hf.mixers.Mixer, got {type(mixer).__name__}")
        self.mixture = mixture
        self.config = config_from(config)
        self.validation = with_general_task(check_validation(validation), mixture, self.config.tikmix_general_sequences)
        self.mixer: Mixer = mixer if mixer is not None else build_mixer(self.config)
        self.collator = collator
        self.history: list[dict] = []
        self.stage = 0
        self._trainer: Trainer | None = None
        self._stages = Stages()
        self._geometry = LoaderGeometry()
        self._windows = WindowLifecycle("probes", strict=False, preconditioner=self.config.tikmix_preconditioner)
        self._batcher: Batcher  # collates with the Trainer's loader: made in on_train_begin (_bind_loader)
        self._val_examples: dict[str, list] = {}
        self._max_steps: int | None = None
        self._tokens = TokenCount()
        self._step = self._tokens_prev = 0
        self._history_path: str | None = None
        self._is_main = True
        self._initial_weights: dict[str, float] | None = None
        self._alignment: dict | None = None  # how an aligned starting mixture came about
        if trainer is not None:
            self.bind(trainer)

    # ------------------------------------------------------------------ set-up
    def bind(self, trainer: Trainer) -> TiKMiXCallback:
        """Log through ``trainer`` and register with it if it does not hold this callback yet; returns ``self``.

        A callback bound before is rebound: the next ``train()`` starts from this Trainer's state.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() takes a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: optim.Optimizer | None = None,
                       train_dataloader: DataLoader | None = None, **kwargs: Any) -> None:
        cfg = self.config
        self._windows.drop()  # one an earlier train() call in this process left open when it failed
        check_trainer(self, self._trainer, args, optimizer)
        if train_dataloader is None:
            raise RuntimeError("TiKMiXCallback needs the Trainer's training DataLoader (transformers >= 4.46)")
        self._bind_loader(train_dataloader, args)
        self._tokens = TokenCount(self.mixture, self._geometry,
                                  getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None))
        self.mixer.check_ready(cfg)
        self._is_main = bool(state.is_world_process_zero)
        self._history_path = os.path.join(str(args.output_dir), "tikmix", "history.json")
        for note in remove_stale_temporaries(os.path.dirname(self._history_path)) if self._is_main else []:
            warnings.warn(f"TiKMiX: {note}; it is harmless, delete it by hand", stacklevel=2)
        self._val_examples = select_validation(self.validation, cfg.tikmix_validation_sequences, cfg.tikmix_seed)
        check_first_batches(self._batcher, self._val_examples, self.mixture, batch_size=self._probe_batch_size(args),
                            probe_sequences=cfg.tikmix_probe_sequences, model=self._measured(model),
                            measures=self.mixer.measures, device=args.device)
        self._max_steps = int(state.max_steps)
        domains = list(self.mixture.domains)
        self._stages = plan_stages(cfg, self._max_steps, self.mixer.plan(cfg, self._max_steps, domains))
        for message in self._stages.warnings:
            warnings.warn(message, stacklevel=2)
        source = cfg.influence_source() if self.mixer.measures else "probes"
        self._windows = WindowLifecycle(source, strict=cfg.tikmix_influence_source == "training",
                                        preconditioner=cfg.tikmix_preconditioner, quota=cfg.window_quota())
        self._windows.plan(plan_windows(self._stages.steps, cfg.tikmix_window_steps))
        check_window_setup(self._windows, self._measured(model), self._trainer, self._geometry)
        if self._stages.counts_tokens:
            self._tokens.seen(state)  # a run that cannot count tokens fails now, not at the first boundary

        saved = (cast(dict, state.stateful_callbacks) or {}).get(type(self).__name__)  # by name, not a list
        saved = saved.get("attributes", {}).get("tikmix") if isinstance(saved, Mapping) else None
        if state.global_step > 0 and saved:
            self._restore(saved, args, state, model)
        elif state.global_step > 0:
            warnings.warn(
                f"resuming at step {state.global_step} from a checkpoint written without TiKMiXCallback: the TiKMiX "
                "schedule starts now, from the mixture's current weights",
                stacklevel=2,
            )
            self._step = state.global_step
            self._tokens_prev = self._tokens.recorded(state)[0] or 0
            self.mixture.seek(self._resume_start(args, state))
        else:  # a fresh start; a second train() of this callback starts the earlier run's weight swaps over
            self.mixture.restart() if self.history else self.mixture.seek(0)
            initial = self._stages.initial if self._stages.initial is not None else cfg.initial_weights()
            with self._collectives("the aligned starting mixture"):
                initial, self._alignment = starting_weights(
                    initial, self.mixture, self.validation, sequences=cfg.tikmix_alignment_sequences,
                    share=cfg.tikmix_alignment_share, seed=cfg.tikmix_seed)
            if initial != "keep":
                self.mixture.set_weights(self.mixture.resolve_weights(initial), at=0)
            self._initial_weights = self.mixture.weights
            self.history, self.stage, self._tokens_prev = [], 0, 0
            self._write_history()
            log_to_integrations(self._trainer, start_metrics(self._initial_weights))
        # Trainer._save_checkpoint indexes stateful_callbacks by name: make sure the entry exists.
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def _bind_loader(self, loader, args) -> None:
        from accelerate.data_loader import IterableDatasetShard

        dataset = loader.dataset
        inner = dataset.dataset if isinstance(dataset, IterableDatasetShard) else dataset
        if inner is not self.mixture:
            raise ValueError(
                "the Trainer's train_dataset is not the DomainMixture given to TiKMiXCallback "
                f"(got {type(inner).__name__}); pass the same mixture as train_dataset"
            )
        g = self._geometry = LoaderGeometry.of(loader, args)
        self.mixture.bind_loader(g.per_worker_batch, num_workers=g.num_workers, prefetch_factor=g.prefetch_factor,
                                 global_batch=g.micro_global, ranks=g.ranks, rank=g.rank)
        self._batcher = Batcher(self.collator or loader.collate_fn, args.device)

    def _collectives(self, what: str):
        """TiKMiX's collectives inside wait at most ``tikmix_collective_timeout`` and name ``what`` when they fail."""
        return collectives(what, self.config.tikmix_collective_timeout)

    def _resume_start(self, args, state) -> int:
        return self._geometry.resume_start(state.global_step, ignore_data_skip=args.ignore_data_skip,
                                           max_steps=state.max_steps)

    def _probe_batch_size(self, args) -> int:
        return self.config.tikmix_probe_batch_size or args.per_device_train_batch_size

    def _validation_batches(self, args) -> dict[str, list]:
        bs = self._probe_batch_size(args)
        return {name: self._batcher.batches(ex, bs) for name, ex in self._val_examples.items()}

    def _shows_progress(self, args) -> bool:
        return bool(self.config.tikmix_show_progress and not args.disable_tqdm and self._is_main)

    def _measured(self, model):
        return measured_module(model, getattr(self._trainer, "model_wrapped", None))

    # ------------------------------------------------------------------ the training window
    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, optimizer: optim.Optimizer | None = None, **kwargs: Any) -> None:
        if self._windows.due(state.global_step):
            with self._collectives(f"stage {self.stage + 1}'s training window, opening at step {state.global_step}"):
                note = self._windows.open(state.global_step, self._measured(model), self._validation_batches(args),
                                          list(self.mixture.domains), optimizer, self._domain_of(state.global_step),
                                          show_progress=self._shows_progress(args))
            if note:
                warnings.warn(f"TiKMiX: {note}", stacklevel=2)

    def _domain_of(self, opened_at: int):
        return self._geometry.domain_reader(opened_at, self.mixture.domain_ids, *rank_and_world())

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """A checkpoint inside a window keeps the window (its validation gradients and sums) beside it."""
        self._windows.save(os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._windows.drop()  # every window closes at its boundary; this only unhooks one a stopped run left open

    # ------------------------------------------------------------------ the stage
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, optimizer: optim.Optimizer | None = None, **kwargs: Any) -> None:
        self._step = state.global_step
        boundary = state.global_step in self._stages.steps
        if self._stages.counts_tokens:
            tokens = self._tokens.seen(state)
            crossed = self._stages.crossed(self._tokens_prev, tokens)
            boundary = boundary or (crossed and state.global_step < state.max_steps)
            self._tokens_prev = tokens
        if boundary:
            self._run_stage(args, state, self._measured(model), optimizer)
        if self.mixture.exhausted == "stop" and state.global_step < state.max_steps:
            # accelerate raises on an iterable that ends early; stop training cleanly instead
            out = self.mixture.exhausted_domains(self._geometry.consumed(state.global_step + 1))
            if out:
                warnings.warn(
                    f"domains {out} run out of examples within the next step (DomainMixture exhausted='stop'): "
                    f"training stops at step {state.global_step}",
                    stacklevel=2,
                )
                control.should_training_stop = True

    def _run_stage(self, args, state, model, optimizer) -> None:
        started = time.perf_counter()
        tokens_seen, tokens_note = self._tokens.recorded(state)
        domains = list(self.mixture.domains)
        before = self.mixture.weights
        with self._collectives(f"stage {self.stage + 1} at step {state.global_step} (measuring S and deciding)"):
            closed, window_note = self._windows.close()
            decision = self.mixer.decide(self._stage_inputs(args, state, model, optimizer, closed, before, tokens_seen))
            new = np.asarray(agree(np.asarray(decision.weights, dtype=np.float64).tolist()), dtype=np.float64)
        # A window's validation pass and hooks ran during the steps before: they are this stage's cost too.
        during = 0.0 if closed is None else closed[0].validation_seconds + closed[0].hook_seconds
        consumed = self._geometry.consumed(state.global_step)
        at = self.mixture.set_weights(dict(zip(domains, new.tolist())), at=consumed + self.mixture.lag_samples())
        after = self.mixture.weights
        record = StageRecord(
            stage=self.stage + 1, step=state.global_step, samples_consumed=consumed, tokens_seen=tokens_seen,
            effective_index=at, weights_before=before, weights_after=after, entropy=entropy(after),
            solver=self.mixer.name, status=decision.status, message=decision.message,
            influence=decision.influence.to_dict() if decision.influence is not None else None,
            solver_result=decision.solver_result.to_dict() if decision.solver_result is not None else None,
            mixer=decision.extra, metrics=dict(decision.metrics),
            seconds=StageSeconds(influence=decision.seconds_measure + during, solve=decision.seconds_solve,
                                 total=time.perf_counter() - started + during),
            notes=[tokens_note] if tokens_note else [],
        )
        record.warnings = stage_notes(record, self.config.tikmix_entropy_warning) + (
            [window_note] if window_note else [])
        for note in record.warnings:
            warnings.warn(f"TiKMiX stage {record.stage}: {note}", stacklevel=2)
        self.history.append(record.to_dict())
        self.stage += 1
        self._write_history()
        self._log(record)

    def _stage_inputs(self, args, state, model, optimizer, closed, before, tokens_seen) -> StageInputs:
        """What the mixer gets at this boundary: probes (only the top-ups where a window measured), validation
        batches, the model, and the facts the scale-aware objective needs."""
        cfg = self.config
        bs = self._probe_batch_size(args)
        domains = list(self.mixture.domains)
        n_probe = cfg.tikmix_probe_sequences
        cap = cfg.tikmix_probe_max_sequences if cfg.tikmix_target_rse is not None else None
        measures = self.mixer.measures
        drawn = draw_probes(self.mixture, n_probe if measures else 0, cap=cap, round=self.stage,
                            seen=None if closed is None else closed[1])
        # the adaptive budget may go past this stage's draw: batches are collated only when asked for
        sources = {d: self._batcher.lazy(drawn[d], bs) for d in domains} if measures and (cap or 0) > n_probe else None
        consumed = self._geometry.consumed
        return StageInputs(
            stage=self.stage,
            step=state.global_step,
            domains=domains,
            prior=np.array([before[d] for d in domains]),
            model=model,
            optimizer=optimizer,
            domain_batches={d: self._batcher.batches(ex[:n_probe], bs) for d, ex in drawn.items()},
            domain_sources=sources,
            max_probe_batches=None if sources is None or cap is None else -(-cap // bs),
            validation_batches=self._validation_batches(args) if measures else {},
            config=cfg,
            show_progress=self._shows_progress(args),
            learning_rate=float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            stage_steps=self._stages.next_boundary(state.global_step, state.max_steps, self._tokens_prev)
            - state.global_step,
            remaining_samples=consumed(state.max_steps) - consumed(state.global_step),
            domain_sizes=self.mixture.domain_sizes(),
            tokens_seen=tokens_seen,
            window=None if closed is None else closed[0],
        )

    def _log(self, record: StageRecord) -> None:
        printers = log_to_integrations(self._trainer, stage_metrics(record, log_matrix=self.config.tikmix_log_matrix))
        if self._is_main and printers:  # the console gets a line where the Trainer prints its logs at all
            tqdm.write(stage_line(record.to_dict()))

    # ------------------------------------------------------------------ history and checkpoints
    def _write_history(self) -> None:
        if self._is_main and self._history_path:
            write_history(self._history_path, domains=list(self.mixture.domains), tasks=list(self.validation),
                          config=self.config.to_dict(), initial_weights=self._initial_weights,
                          alignment=self._alignment, max_steps=self._max_steps, stages=self.history)

    def state(self) -> dict:
        """JSON-only checkpoint state (``ExportableState``): stage, schedule, stream position, history."""
        saved = CallbackState(
            stage=self.stage, step=self._step, tokens_prev=self._tokens_prev, tasks=list(self.validation),
            mixture=self.mixture.state_dict(position=self._geometry.consumed(self._step)),
            mixer_name=self.mixer.name, mixer_state=self.mixer.state_dict(), initial_weights=self._initial_weights,
            history=self.history, window=self._windows.state(), influence_source=self._windows.source,
            alignment=self._alignment,
        )
        return {"args": {}, "attributes": {"tikmix": saved.to_json()}}

    def _restore(self, saved: Mapping, args, state, model=None) -> None:
        restored = CallbackState.from_json(saved)
        restored.check_resumable(tasks=list(self.validation), mixer_name=self.mixer.name)
        self.mixture.load_state_dict(restored.mixture)  # refuses other domains, clearly
        g = self._geometry
        restored.check_position(g.consumed(state.global_step), state.global_step, g.grad_accum * g.micro_global)
        self.stage, self._step, self._tokens_prev = restored.stage, restored.step, restored.tokens_prev
        self._initial_weights, self._alignment = restored.initial_weights, restored.alignment
        self.history = list(restored.history)
        self.mixer.load_state_dict(restored.mixer_state)
        self.mixture.seek(self._resume_start(args, state))
        self.mixture.check_resume_layout()  # streamed domains read by shard: refused now, not at the first batch
        with self._collectives(f"the resume at step {state.global_step} (agreeing on the training window's files)"):
            note = self._windows.restore(
                os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"), restored.window,
                self._measured(model), self._validation_batches(args), list(self.mixture.domains), self._domain_of,
                step=state.global_step, micro_steps=g.grad_accum, show_progress=self._shows_progress(args),
                saved_source=restored.influence_source)
        if note:
            warnings.warn(note, stacklevel=3)
        if not args.ignore_data_skip and state.global_step > 0:
            logger.info("TiKMiX: set ignore_data_skip=True to resume without replaying the skipped batches")
        self._write_history()  # drops stages a killed run wrote after this checkpoint
