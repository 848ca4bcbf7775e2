"""The thin adapter between ``transformers.Trainer`` and TiKMiX.

At each stage boundary (decided in ``on_step_end`` from the global step or the token count, values
identical on every rank) the callback

1. draws probe examples of every domain from the mixture's probe stream and the fixed validation
   examples of every task, collated by the Trainer's own collator (with
   ``tikmix_influence_source="training"`` a :class:`~tikmix_hf.influence.TrainingWindow` opened
   ``tikmix_window_steps`` steps earlier has read the training micro-batches instead, and probes
   only top up the domains it saw too little of);
2. measures the Group Influence matrix ``S`` (:func:`tikmix_hf.group_influence`, paper Eq. 8);
3. solves for the next mixture (:func:`tikmix_hf.solve_direct` or :func:`tikmix_hf.solve_surrogate`,
   Eqs. 9-11 and Algorithm 1);
4. schedules the new weights on the mixture at a sample index past everything the data pipeline
   may already have drawn (:meth:`tikmix_hf.DomainMixture.set_weights`), identical on every rank;
5. appends the stage to ``<output_dir>/tikmix/history.json`` and logs ``tikmix/*`` metrics through
   ``Trainer.log`` so every ``report_to`` integration receives them.

Steps 2 and 3 are the mixer's (:mod:`tikmix_hf.mixers`, chosen by ``tikmix_solver``), which measures
with :mod:`tikmix_hf.influence` and decides with :mod:`tikmix_hf.solvers`; nothing here computes
influence or solves anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback
from transformers.utils import logging

from ._distributed import agree, rank_and_world
from ._io import load_tensors, remove_stale_temporaries, save_json_atomic, save_tensors_atomic
from .config import DEFAULT_FRACTIONS, TiKMiXConfig
from .history import HISTORY_FORMAT
from .influence import TrainingWindow
from .influence.checks import check_batch
from .mixers import Mixer, StageInputs, StagePlan, build_mixer
from .mixture import DomainMixture
from .report import stage_line
from .training_args import config_from

logger = logging.get_logger(__name__)

STATE_FORMAT = "tikmix_hf.callback/1"
#: A checkpoint taken inside a training window keeps each rank's part of it in this file of the checkpoint folder.
WINDOW_FILE = "tikmix_window-rank{rank}.safetensors"
STATUS_CODES = {"converged": 0, "restarted": 1, "fallback": 2, "skipped": 3, "replayed": 4}


def _log_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


class TiKMiXCallback(TrainerCallback, ExportableState):
    r"""Re-mix the training domains at stage boundaries from their Group Influence on validation tasks.

    Args:
        mixture: the :class:`~tikmix_hf.DomainMixture` that is the Trainer's ``train_dataset``.
        validation: task name -> dataset of tokenised examples with ``labels`` (a ``datasets.Dataset``,
            a list of dicts, ...). ``tikmix_validation_sequences`` examples per task, chosen once with
            ``tikmix_seed``, give each task's gradient at every stage.
        config: a :class:`~tikmix_hf.TiKMiXConfig` (or a :class:`~tikmix_hf.TiKMiXTrainingArguments`);
            defaults when ``None``.
        collator: turns a list of examples into a model batch; default: the collator of the
            Trainer's training DataLoader.

    Example::

        mixture = DomainMixture({"code": code, "prose": prose, "noise": noise}, weights="natural")
        callback = TiKMiXCallback(mixture, {"held_out_code": val_code}, TiKMiXConfig(tikmix_stage_steps=500))
        trainer = Trainer(model=model, args=args, train_dataset=mixture, data_collator=collator,
                          callbacks=[callback])
        callback.bind(trainer)
        trainer.train()

    The callback logs through its Trainer, which it is given explicitly: ``trainer=`` here or
    :meth:`bind` (which also registers the callback with the Trainer when it is not yet registered).
    Binding to another Trainer (a notebook rerun, a sweep) replaces the first; a callback still bound
    to an earlier Trainer refuses to start, with the fix. Checkpoints hold its state (JSON only) and it
    restores itself in ``on_train_begin``; keep
    ``restore_callback_states_from_checkpoint=False``. ``ignore_data_skip=True`` makes a resume
    jump straight to the saved stream position instead of replaying the skipped batches.
    """

    def __init__(self, mixture: DomainMixture, validation: Mapping[str, Any], config: TiKMiXConfig | None = None, *,
                 trainer: Trainer | None = None, collator=None):
        if not isinstance(mixture, DomainMixture):
            raise TypeError(
                f"mixture must be a tikmix_hf.DomainMixture, got {type(mixture).__name__}; wrap your domains with "
                "DomainMixture({name: dataset, ...}) and pass it as the Trainer's train_dataset too"
            )
        self.mixture = mixture
        self.validation = self._check_validation(validation)
        self.config = config_from(config)
        self.mixer: Mixer = build_mixer(self.config)
        self.collator = collator
        self.history: list[dict] = []
        self.stage = 0
        self._trainer: Trainer | None = None
        self._boundaries: set[int] = set()
        self._plan: StagePlan | None = None  # boundaries the mixer fixes itself (a replayed schedule)
        self._max_steps: int | None = None
        self._tokens_prev = 0
        self._step = 0
        self._micro_global = 1  # stream samples per micro-step, all ranks together
        self._grad_accum = 1
        self._history_path: str | None = None
        self._val_examples: dict[str, list] | None = None
        self._is_main = True
        self._initial_weights: dict[str, float] | None = None
        self._loader_collate = None
        self._device = None
        self._count_input_tokens = False
        self._window: TrainingWindow | None = None  # open over the steps before a boundary (influence_source=training)
        self._window_opens: dict[int, int] = {}  # step at which a window opens -> the boundary it measures for
        self._window_step = 0  # the step at whose start the open window opened
        self._source = "probes"  # where this run measures S: the config's choice, resolved when training starts
        if trainer is not None:
            self.bind(trainer)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_validation(validation) -> dict[str, Any]:
        if isinstance(validation, Mapping):
            items = list(validation.items())
        elif isinstance(validation, (list, tuple)) and all(isinstance(x, tuple) and len(x) == 2 for x in validation):
            items = list(validation)
        else:
            raise TypeError(
                f"validation must be a mapping task name -> dataset, got {type(validation).__name__}"
            )
        if not items:
            raise ValueError("validation is empty: give at least one task, e.g. {'held_out': dataset}")
        seen: dict[str, str] = {}
        for name, data in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"validation task names must be non-empty strings, got {name!r}")
            key = _log_key(name)
            if key in seen:
                raise ValueError(
                    f"validation task names {seen[key]!r} and {name!r} clash (both log as tikmix/influence/{key}); "
                    "rename one"
                )
            seen[key] = name
            try:
                size = len(data)
            except TypeError:
                size = None
            if size == 0:
                raise ValueError(f"validation task {name!r} has no examples")
        return dict(items)

    def bind(self, trainer: Trainer) -> "TiKMiXCallback":
        """Log through ``trainer`` and register with it if it does not hold this callback yet; returns ``self``.

        A callback bound before is rebound: the next ``train()`` starts from this Trainer's state.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"bind() takes a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def _check_binding(self, args, optimizer) -> None:
        if self._trainer is None:
            raise RuntimeError(
                "TiKMiXCallback is not bound to a Trainer: call callback.bind(trainer) after creating the Trainer "
                "(or pass trainer= to TiKMiXCallback)"
            )
        if self not in self._trainer.callback_handler.callbacks or (
            optimizer is not None and optimizer is not self._trainer.optimizer
        ):
            raise RuntimeError(
                "TiKMiXCallback is bound to another Trainer than the one now training (a callback reused from an "
                "earlier run?); call callback.bind(trainer) with the Trainer you train"
            )
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "restore_callback_states_from_checkpoint=True would rebuild TiKMiXCallback without its mixture and "
                "validation sets; set it to False: TiKMiXCallback restores its own state from the checkpoint"
            )

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        cfg = self.config
        self._drop_window()  # one an earlier train() call in this process left open when it failed
        self._check_binding(args, optimizer)
        if train_dataloader is None:
            raise RuntimeError("TiKMiXCallback needs the Trainer's training DataLoader (transformers >= 4.46)")
        self._bind_loader(train_dataloader, args)
        self._device = args.device
        self._count_input_tokens = getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False, None)
        self.mixer.check_ready(cfg)
        self._is_main = bool(state.is_world_process_zero)
        self._grad_accum = args.gradient_accumulation_steps
        self._history_path = os.path.join(args.output_dir, "tikmix", "history.json")
        if self._is_main:
            remove_stale_temporaries(os.path.dirname(self._history_path))
        self._val_examples = self._select_validation()
        self._check_first_batches(args, model)
        self._max_steps = int(state.max_steps)
        self._boundaries = self._plan_boundaries(state.max_steps)
        self._source = cfg.influence_source() if self.mixer.measures else "probes"
        self._window_opens = self._plan_windows()
        if self.config.tikmix_stage_tokens or (self._plan is not None and self._plan.tokens):
            self._tokens_seen(state)  # a run that cannot count tokens fails now, not at the first boundary

        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved.get("attributes", {}).get("tikmix") if isinstance(saved, Mapping) else None
        if state.global_step > 0 and saved:
            self._restore(saved, args, state, train_dataloader, model)
        elif state.global_step > 0:
            warnings.warn(
                f"resuming at step {state.global_step} from a checkpoint written without TiKMiXCallback: the TiKMiX "
                "schedule starts now, from the mixture's current weights",
                stacklevel=2,
            )
            self._step = state.global_step
            self._tokens_prev = self._tokens_seen(state)
            self.mixture.seek(self._resume_start(state.global_step, args, state, train_dataloader))
        else:
            self.mixture.seek(0)
            initial = cfg.initial_weights()
            if self._plan is not None and self._plan.initial is not None:
                initial = self._plan.initial
            if initial != "keep":
                self.mixture.set_weights(self.mixture.resolve_weights(initial), at=0)
            self._initial_weights = self.mixture.weights
            self.history, self.stage, self._tokens_prev = [], 0, 0
            self._write_history()
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
        batch = loader.batch_size or args.per_device_train_batch_size
        split = bool(getattr(args.accelerator_config, "split_batches", False))
        world = max(args.world_size, 1)
        if isinstance(dataset, IterableDatasetShard):  # dispatch_batches=False: every rank reads everything
            per_worker_batch = dataset.batch_size * (1 if dataset.split_batches else dataset.num_processes)
        else:  # one process, or rank 0 reading for all (dispatch_batches=True)
            per_worker_batch = batch
        # Stream samples consumed per micro-step, all ranks together (accelerate's own total_batch_size
        # does not count the ranks of an IterableDatasetShard).
        self._micro_global = int(batch if split else batch * world)
        # dispatch_batches=False: each process keeps its own slice of every batch, so it need read only that
        sliced = isinstance(dataset, IterableDatasetShard) and dataset.num_processes > 1
        self.mixture.bind_loader(
            int(per_worker_batch),
            num_workers=loader.num_workers,
            prefetch_factor=loader.prefetch_factor,
            global_batch=self._micro_global,
            ranks=dataset.num_processes if sliced else None,
            rank=dataset.process_index if sliced else None,
        )
        self._loader_collate = loader.collate_fn

    def _plan_boundaries(self, max_steps: int) -> set[int]:
        cfg = self.config
        # A mixer may fix its own boundaries (a replayed schedule does); then the config sets none.
        self._plan = self.mixer.plan(cfg, max_steps, list(self.mixture.domains))
        if self._plan is not None:
            return set(self._plan.steps)
        if cfg.tikmix_stage_tokens:
            bounds: set[int] = set()  # decided as tokens are seen
        elif cfg.tikmix_stage_steps:
            bounds = set(range(cfg.tikmix_stage_steps, max(max_steps, 1), cfg.tikmix_stage_steps))
            if cfg.tikmix_stage_steps >= max_steps:
                warnings.warn(
                    f"tikmix_stage_steps={cfg.tikmix_stage_steps} is not shorter than training "
                    f"(max_steps={max_steps}): "
                    "no stage boundary falls inside this run, the mixture will not change",
                    stacklevel=3,
                )
        else:
            fractions = cfg.tikmix_stage_fractions or list(DEFAULT_FRACTIONS[cfg.tikmix_objective])
            bounds = {s for s in (round(f * max_steps) for f in fractions) if 0 < s < max_steps}
            if not bounds:
                warnings.warn(
                    f"no stage boundary at fractions {fractions} of max_steps={max_steps} falls inside training",
                    stacklevel=3,
                )
        if cfg.tikmix_warmup_steps:
            if cfg.tikmix_warmup_steps >= max_steps:
                warnings.warn(
                    f"tikmix_warmup_steps={cfg.tikmix_warmup_steps} is not shorter than max_steps={max_steps}",
                    stacklevel=3,
                )
            else:
                bounds.add(cfg.tikmix_warmup_steps)
        return bounds

    def _plan_windows(self) -> dict[int, int]:
        """``{step at whose start a training window opens: its boundary}``.

        A window spans up to ``tikmix_window_steps`` steps and at most the second half of its stage:
        the first steps after a decision still draw the old weights (the pipeline's lag) and move
        fastest, and the first steps of training start from a random model.
        """
        if self._source != "training":
            return {}
        opens, previous = {}, 0
        for boundary in sorted(self._boundaries):
            opens[boundary - max(1, min(self.config.tikmix_window_steps, (boundary - previous) // 2))] = boundary
            previous = boundary
        return opens

    def _tokens_seen(self, state) -> int:
        if self._count_input_tokens:
            return int(state.num_input_tokens_seen)
        drawn = self.mixture.drawn(self._consumed(state.global_step))
        tokens = [v["tokens"] for v in drawn.values()]
        if any(t is None for t in tokens):
            raise ValueError(
                "tikmix_stage_tokens needs token counts: set TrainingArguments.include_num_input_tokens_seen=True, "
                "or use map-style domains whose examples carry input_ids"
            )
        return int(sum(tokens))

    def _consumed(self, global_step: int) -> int:
        return int(global_step) * self._grad_accum * self._micro_global

    def _resume_start(self, global_step, args, state, loader) -> int:
        """The stream index the resumed DataLoader must start from."""
        consumed = self._consumed(global_step)
        if args.ignore_data_skip:
            return consumed
        # The Trainer will replay-and-discard the batches already trained in this epoch: start at the epoch.
        try:
            per_epoch = max(len(loader) // args.gradient_accumulation_steps, 1)
        except TypeError:
            per_epoch = state.max_steps
        skipped_micro = (global_step % per_epoch) * args.gradient_accumulation_steps
        return consumed - skipped_micro * self._micro_global

    def _select_validation(self) -> dict[str, list]:
        cfg, out = self.config, {}
        for t, (name, data) in enumerate(self.validation.items()):
            n = cfg.tikmix_validation_sequences
            try:
                size = len(data)
            except TypeError:
                size = None
            if size is not None and hasattr(data, "__getitem__"):
                rng = np.random.default_rng([cfg.tikmix_seed, 0xA11, t])
                idx = rng.permutation(size)[: min(n, size)]
                examples = [data[int(i)] for i in idx]
            else:
                examples = []
                for example in data:
                    examples.append(example)
                    if len(examples) == n:
                        break
            if not examples:
                raise ValueError(f"validation task {name!r} has no examples")
            out[name] = examples
        return out

    def _check_first_batches(self, args, model) -> None:
        """Collate one validation batch per task and one probe batch per domain now, not hours later.

        The checks are the influence engine's own, so a batch that passes here passes at the boundary.
        """
        bs = self.config.tikmix_probe_batch_size or args.per_device_train_batch_size
        # The device the engine compares with is the parameters' ("cpu"), which is not args.device ("cpu:0").
        device = next(model.parameters()).device if model is not None else self._device
        for name, examples in self._val_examples.items():
            check_batch(self._collate(examples[:bs]), f"validation task {name!r} batch 0", device)
        for domain in self.mixture.domains:
            examples = self.mixture.probe(domain, min(bs, self.config.tikmix_probe_sequences), round=0)
            check_batch(self._collate(examples), f"probe batch of domain {domain!r}", device)

    # ------------------------------------------------------------------ the training window
    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self._window_opens and self._window is None:
            self._open_window(args, state, self._measured_model(model), optimizer)

    def _open_window(self, args, state, model, optimizer) -> None:
        """Measure the validation gradients now and hook the coming training micro-batches."""
        cfg = self.config
        try:
            window = TrainingWindow(model, self._validation_batches(args), list(self.mixture.domains),
                                    preconditioner=cfg.tikmix_preconditioner, optimizer=optimizer,
                                    show_progress=self._shows_progress(args),
                                    strict=cfg.tikmix_influence_source == "training")
            window.attach(self._domain_of(state.global_step))
        except ValueError as error:  # this model cannot be read in hooks (FSDP, no nn.Linear output layer, ...)
            if cfg.tikmix_influence_source == "training":
                raise
            warnings.warn(f"TiKMiX: {self._to_probes(str(error))}", stacklevel=3)
            return
        self._window = window
        self._window_step = state.global_step

    def _to_probes(self, why: str) -> str:
        """``tikmix_influence_source="auto"`` on a run the window cannot read: probes from now on; the note to say."""
        self._source, self._window_opens = "probes", {}
        return f"the training window cannot measure this run ({why}): TiKMiX measures with probes instead"

    def _drop_window(self) -> None:
        if self._window is not None:
            self._window.detach()
            self._window = None

    def on_train_end(self, args, state, control, **kwargs):
        self._drop_window()  # every window closes at its boundary; this only unhooks one a stopped run left open

    def _domain_of(self, opened_at: int):
        """``(k, rows) -> domain ids`` of this rank's ``k``-th training micro-batch since step ``opened_at``."""
        first = self._consumed(opened_at)
        rank, world = rank_and_world()
        rows = self._micro_global // max(world, 1)

        def domain_of(k: int, got: int) -> np.ndarray:
            # Micro-batch k of this rank holds samples [start, start + rows) of the stream: accelerate gives
            # rank r the r-th slice of every global batch, in stream order.
            if got != rows:
                raise ValueError(
                    f"a training micro-batch has {got} sequences where the stream gives each rank {rows} per "
                    "micro-step (a collator that packs or splits examples?); the training window needs one row per "
                    "mixture example: use tikmix_influence_source='probes'"
                )
            start = first + k * self._micro_global + rank * rows
            return self.mixture.domain_ids(start, start + rows)

        return domain_of

    def _validation_batches(self, args) -> dict[str, list]:
        bs = self.config.tikmix_probe_batch_size or args.per_device_train_batch_size
        return {name: self._batches(ex, bs) for name, ex in self._val_examples.items()}

    def _shows_progress(self, args) -> bool:
        return bool(self.config.tikmix_show_progress and not args.disable_tqdm and self._is_main)

    def _window_path(self, args, step: int) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{step}", WINDOW_FILE.format(rank=rank_and_world()[0]))

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint inside a window keeps the window (its validation gradients and sums) beside it."""
        if self._window is not None:
            meta, tensors = self._window.state()
            save_tensors_atomic(self._window_path(args, state.global_step), tensors,
                                {"tikmix": json.dumps(meta), "opened_at": str(self._window_step)})

    def _resume_window(self, args, state, model, opened_at: int) -> None:
        path = self._window_path(args, state.global_step)
        if not os.path.isfile(path):
            warnings.warn(
                f"the checkpoint was taken inside a training window but its window state is not at {path}: the "
                "coming stage is measured with probes",
                stacklevel=3,
            )
            return
        tensors, meta = load_tensors(path)
        window = TrainingWindow.restore(
            self._measured_model(model), self._validation_batches(args), list(self.mixture.domains),
            json.loads(meta["tikmix"]), tensors,
            show_progress=self._shows_progress(args), strict=self.config.tikmix_influence_source == "training",
        )
        window.attach(self._domain_of(opened_at))
        self._window, self._window_step = window, opened_at

    # ------------------------------------------------------------------ the stage
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._step = state.global_step
        boundary = state.global_step in self._boundaries
        marks = self._plan.tokens if self._plan is not None else []
        if self.config.tikmix_stage_tokens or marks:
            tokens = self._tokens_seen(state)
            period = self.config.tikmix_stage_tokens
            crossed = (tokens // period > self._tokens_prev // period) if period else any(
                self._tokens_prev < m <= tokens for m in marks)
            boundary = boundary or (crossed and state.global_step < state.max_steps)
            self._tokens_prev = tokens
        if boundary:
            self._run_stage(args, state, self._measured_model(model), optimizer)
        if self.mixture.exhausted == "stop" and state.global_step < state.max_steps:
            # accelerate raises on an iterable that ends early; stop training cleanly instead
            out = self.mixture.exhausted_domains(self._consumed(state.global_step + 1))
            if out:
                warnings.warn(
                    f"domains {out} run out of examples within the next step (DomainMixture exhausted='stop'): "
                    f"training stops at step {state.global_step}",
                    stacklevel=2,
                )
                control.should_training_stop = True

    def _measured_model(self, model):
        """The module to measure through: the FSDP1 wrapper when the Trainer has one.

        The Trainer hands callbacks the model inside an FSDP1 wrapper, whose parameters are shards
        that only the wrapper's forward gathers; FSDP2 and DDP models are handed over as they are.
        """
        wrapped = getattr(self._trainer, "model_wrapped", None)
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:
            return model
        return wrapped if isinstance(wrapped, FullyShardedDataParallel) else model

    def _collate(self, examples: list) -> dict:
        collate = self.collator or self._loader_collate
        batch = collate(examples)
        return {k: (v.to(self._device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _batches(self, examples: list, batch_size: int) -> list[dict]:
        return [self._collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]

    def _lazy_batches(self, examples: list, batch_size: int):
        """``k -> batch k`` of ``examples`` (``None`` past the end), collated on demand."""

        def batch(k: int):
            lo = k * batch_size
            return self._collate(examples[lo : lo + batch_size]) if lo < len(examples) else None

        return batch

    def _run_stage(self, args, state, model, optimizer) -> None:
        cfg = self.config
        started = time.perf_counter()
        tokens_seen = self._safe_tokens(state)
        bs = cfg.tikmix_probe_batch_size or args.per_device_train_batch_size
        domains = self.mixture.domains
        before = self.mixture.weights
        n_probe = cfg.tikmix_probe_sequences
        cap = cfg.tikmix_probe_max_sequences if cfg.tikmix_target_rse is not None else None
        measures = self.mixer.measures
        window, window_note = self._close_window(state)
        # A window measured most domains already: probes only top up those it saw too little of.
        wanted = {d: n_probe if window is None else max(n_probe - window[1][d]["sequences"], 0) for d in domains}
        drawn = {d: self.mixture.probe(d, max(wanted[d], cap or 0), round=self.stage) if measures and wanted[d]
                 else [] for d in domains}
        if window is not None:
            drawn = {d: ex for d, ex in drawn.items() if ex}
            domains_drawn = list(drawn)
        else:
            domains_drawn = list(domains)
        sources = None
        if measures and cap is not None and cap > n_probe:
            # the adaptive budget may go past this stage's draw: batches are collated only when asked for
            sources = {d: self._lazy_batches(drawn[d], bs) for d in domains}
        inputs = StageInputs(
            stage=self.stage,
            step=state.global_step,
            domains=list(domains),
            prior=np.array([before[d] for d in domains]),
            model=model,
            optimizer=optimizer,
            domain_batches={d: self._batches(drawn[d][:n_probe], bs) for d in domains_drawn},
            domain_sources=sources,
            max_probe_batches=-(-cap // bs) if sources is not None else None,
            validation_batches=self._validation_batches(args) if measures else {},
            config=cfg,
            show_progress=self._shows_progress(args),
            learning_rate=float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            stage_steps=self._next_boundary(state) - state.global_step,
            remaining_samples=self._consumed(state.max_steps) - self._consumed(state.global_step),
            domain_sizes=self.mixture.domain_sizes(),
            tokens_seen=tokens_seen,
            window=None if window is None else window[0],
        )
        decision = self.mixer.decide(inputs)
        new = np.asarray(agree(np.asarray(decision.weights, dtype=np.float64).tolist()), dtype=np.float64)
        # A window's validation pass and hooks ran during the steps before: they are this stage's cost too.
        during = 0.0 if window is None else window[0].validation_seconds + window[0].hook_seconds
        total = time.perf_counter() - started + during

        consumed = self._consumed(state.global_step)
        at = self.mixture.set_weights(dict(zip(domains, new.tolist())), at=consumed + self.mixture.lag_samples())
        after = self.mixture.weights
        entropy = -sum(w * math.log(w) for w in after.values() if w > 0)
        notes = []
        if len(domains) > 1 and entropy < cfg.tikmix_entropy_warning * math.log(len(domains)):
            notes.append(
                f"the weights' entropy {entropy:.3f} is below {cfg.tikmix_entropy_warning} x log({len(domains)}): "
                "the mixture is collapsing onto few domains (consider tikmix_floor or tikmix_max_change)"
            )
        if decision.status == "skipped":
            notes.append(decision.message)
        if window_note:
            notes.append(window_note)
        for note in notes:
            warnings.warn(f"TiKMiX stage {self.stage + 1}: {note}", stacklevel=2)
        entry = {
            "stage": self.stage + 1,
            "step": state.global_step,
            "samples_consumed": consumed,
            "tokens_seen": tokens_seen,
            "effective_index": at,
            "weights_before": before,
            "weights_after": after,
            "entropy": entropy,
            "solver": cfg.tikmix_solver,
            "status": decision.status,
            "message": decision.message,
            "influence": decision.influence.to_dict() if decision.influence is not None else None,
            "solver_result": decision.solver_result.to_dict() if decision.solver_result is not None else None,
            "mixer": decision.extra,
            "seconds": {"influence": decision.seconds_measure + during, "solve": decision.seconds_solve,
                        "total": total},
            "warnings": notes,
        }
        self.history.append(entry)
        self.stage += 1
        self._write_history()
        self._log(entry)

    def _close_window(self, state) -> tuple[tuple[TrainingWindow, dict] | None, str | None]:
        """The training window of this boundary, closed, with what each domain contributed; or why there is none."""
        window, self._window = self._window, None
        if window is None:
            if self._source != "training":
                return None, None
            return None, (
                "no training window was open before this boundary (the run was resumed from a checkpoint inside it "
                "without its window file): this stage was measured with probes"
            )
        counts = window.close()
        if window.failure is not None:
            return None, self._to_probes(window.failure) + " (this stage included)"
        return (window, counts), None

    def _next_boundary(self, state) -> int:
        """The step of the next decision, or the end of training (token-based stages: one period on)."""
        later = [b for b in self._boundaries if b > state.global_step]
        if self.config.tikmix_stage_tokens and state.global_step > 0:
            tokens_per_step = max(self._tokens_prev / state.global_step, 1.0)
            later.append(state.global_step + max(1, round(self.config.tikmix_stage_tokens / tokens_per_step)))
        return min([*later, state.max_steps])

    def _safe_tokens(self, state) -> int | None:
        try:
            return self._tokens_seen(state)
        except ValueError:
            return None

    def _log(self, entry: dict) -> None:
        logs: dict[str, float] = {"tikmix/stage": float(entry["stage"])}
        for d, w in entry["weights_after"].items():
            logs[f"tikmix/weight/{_log_key(d)}"] = float(w)
        logs["tikmix/entropy"] = float(entry["entropy"])
        logs["tikmix/status"] = float(STATUS_CODES.get(entry["status"], -1))
        logs["tikmix/seconds"] = float(entry["seconds"]["total"])
        logs["tikmix/seconds_influence"] = float(entry["seconds"]["influence"])
        trust = (entry.get("mixer") or {}).get("trust_region")
        if trust:
            logs["tikmix/trust_radius"] = float(trust["radius_used"])
            for kind, key in (("predicted_gain", "predicted_gain_next"), ("realised_gain", "realised_gain")):
                for task, value in (trust.get(key) or {}).items():
                    if value is not None:
                        logs[f"tikmix/{kind}/{_log_key(task)}"] = float(value)
        influence = entry["influence"]
        if self.config.tikmix_log_matrix and influence is not None:
            for t, row in zip(influence["task_names"], influence["scores"]):
                for d, s in zip(influence["domain_names"], row):
                    logs[f"tikmix/influence/{_log_key(t)}/{_log_key(d)}"] = float(s)
        # Every report_to integration gets the whole dict; the console printers would print all of it
        # (tasks x domains entries), so they sit this call out and the console gets one line instead.
        handler = self._trainer.callback_handler
        everyone = handler.callbacks
        printers = [cb for cb in everyone if isinstance(cb, (ProgressCallback, PrinterCallback))]
        handler.callbacks = [cb for cb in everyone if cb not in printers]
        try:
            self._trainer.log(logs)
        finally:
            handler.callbacks = everyone
        if self._is_main and printers:  # the console gets a line where the Trainer prints its logs at all
            tqdm.write(stage_line(entry))

    # ------------------------------------------------------------------ history and checkpoints
    def _history_document(self) -> dict:
        return {
            "format": HISTORY_FORMAT,
            "domains": list(self.mixture.domains),
            "tasks": list(self.validation),
            "config": self.config.to_dict(),
            "initial_weights": self._initial_weights,
            "max_steps": self._max_steps,  # so that a schedule read from this history can speak in fractions
            "stages": self.history,
        }

    def _write_history(self) -> None:
        if self._is_main and self._history_path:
            try:
                save_json_atomic(self._history_path, self._history_document())
            except OSError as err:
                raise OSError(
                    f"TiKMiX could not write its history to {self._history_path} ({err}); the previous history file "
                    "is left intact. Free disk space or fix the folder's permissions, then resume from the last "
                    "checkpoint"
                ) from err

    def state(self) -> dict:
        """JSON-only checkpoint state (``ExportableState``): stage, schedule, stream position, history."""
        return {
            "args": {},
            "attributes": {
                "tikmix": {
                    "format": STATE_FORMAT,
                    "stage": self.stage,
                    "step": self._step,
                    "tokens_prev": self._tokens_prev,
                    "tasks": list(self.validation),
                    "mixture": self.mixture.state_dict(position=self._consumed(self._step)),
                    "initial_weights": self._initial_weights,
                    "mixer": {"name": self.mixer.name, "state": self.mixer.state_dict()},
                    "history": self.history,
                    "window": None if self._window is None else {"opened_at": self._window_step},
                    "influence_source": self._source,
                }
            },
        }

    def _restore(self, saved: Mapping, args, state, loader, model=None) -> None:
        if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT:
            raise ValueError(
                "the checkpoint's TiKMiXCallback state is not in format "
                f"{STATE_FORMAT!r}: it was written by another version or has been modified"
            )
        tasks = list(saved.get("tasks", []))
        if tasks != list(self.validation):
            raise ValueError(
                f"the checkpoint was trained with validation tasks {tasks} but this run has {list(self.validation)}; "
                "resume with the same tasks"
            )
        self.mixture.load_state_dict(saved["mixture"])  # refuses other domains, clearly
        position = int(saved["mixture"]["position"])
        if position != self._consumed(state.global_step):
            raise ValueError(
                f"the checkpoint's mixture position {position} does not match step {state.global_step} x "
                f"{self._grad_accum} x {self._micro_global} samples: resume with the same batch size, gradient "
                "accumulation and number of processes"
            )
        self.stage = int(saved["stage"])
        self._step = int(saved["step"])
        self._tokens_prev = int(saved.get("tokens_prev", 0))
        self._initial_weights = saved.get("initial_weights")
        self.history = list(saved.get("history", []))
        mixer = saved.get("mixer") or {"name": self.mixer.name, "state": {}}
        if mixer.get("name") != self.mixer.name:
            raise ValueError(
                f"the checkpoint was trained with tikmix_solver={mixer.get('name')!r} but this run uses "
                f"{self.mixer.name!r}; resume with the same solver"
            )
        self.mixer.load_state_dict(mixer.get("state") or {})
        self.mixture.seek(self._resume_start(state.global_step, args, state, loader))
        if saved.get("influence_source") == "probes" and self._source == "training":
            self._source, self._window_opens = "probes", {}  # the saved run had fallen back to probes
        if saved.get("window"):
            self._resume_window(args, state, model, int(saved["window"]["opened_at"]))
        if not args.ignore_data_skip and state.global_step > 0:
            logger.info("TiKMiX: set ignore_data_skip=True to resume without replaying the skipped batches")
        self._write_history()  # drops stages a killed run wrote after this checkpoint


__all__ = ["TiKMiXCallback"]
