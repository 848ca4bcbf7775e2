"""``tikmix train``: a ``run_clm``-style script over ``HfArgumentParser`` flags, launchable with torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import UsageError, check_folder
from .models import ModelArguments, build_model, build_tokenizer, model_config_spec
from .sources import load_texts, pack_all, parse_sources, parse_weights


@dataclass
class DataArguments:
    """Which text ``tikmix train`` mixes and validates on."""

    domain: list[str] = field(
        default_factory=list,
        metadata={"help": "Training domains: NAME=PATH (repeatable), a YAML/JSON mapping file, or inline JSON.",
                  "aliases": ["--domains"], "action": "extend"},
    )
    validation: list[str] = field(
        default_factory=list,
        metadata={"help": "Validation tasks, given like --domain; TiKMiX measures influence on them.",
                  "action": "extend"},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of .jsonl/.json rows and datasets."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block (documents are packed)."})
    mixture_weights: str = field(
        default="natural", metadata={"help": "Starting mixture: natural (token shares), uniform or a JSON mapping."}
    )
    static_mixture: bool = field(
        default=False, metadata={"help": "Train on the starting mixture without TiKMiX (a baseline)."}
    )


def _train_parser():
    from transformers import HfArgumentParser

    from ..training_args import TiKMiXTrainingArguments

    # transformers types each dataclass as NewType("DataClassType", Any), which a class does not match.
    parser_types = (ModelArguments, DataArguments, TiKMiXTrainingArguments)
    return HfArgumentParser(parser_types, prog="tikmix train")  # type: ignore[arg-type]


def _inject_distributed_defaults(argv: list[str]) -> list[str]:
    """Defaults for several processes, unless given: gloo on CPU (nccl needs GPUs), and no search for unused
    parameters (a causal LM uses all of them; the search costs a graph traversal per step)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return argv
    flags = {a.split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    extra = []
    if "__ddp_backend" not in flags and not torch.cuda.is_available():
        extra += ["--ddp_backend", "gloo"]
    if "__ddp_find_unused_parameters" not in flags:
        extra += ["--ddp_find_unused_parameters", "false"]
    return [*argv, *extra]


#: ``tikmix train``'s defaults for a new model: the Trainer's own (5e-5, no warm-up, linear decay) suit
#: fine-tuning, and a model trained from scratch barely moves with them.
NEW_MODEL_DEFAULTS = {"--learning_rate": "1e-3", "--lr_scheduler_type": "cosine", "--warmup_steps": "0.05"}


def _inject_new_model_defaults(argv: list[str]) -> list[str]:
    """:data:`NEW_MODEL_DEFAULTS` where the model is new (no ``--model_name_or_path``) and the flag is not given."""
    flags = {a.split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if "__model_name_or_path" in flags:
        return argv
    extra = [x for flag, value in NEW_MODEL_DEFAULTS.items() if flag.replace("-", "_") not in flags
             for x in (flag, value)]
    return [*argv, *extra]


def _unused_hint(message: str, argv: list[str]) -> str:
    """``message``, and where HfArgumentParser left a value unused, the flag before it and how to pass it."""
    prefix = "Some specified arguments are not used by the HfArgumentParser: "
    if not message.startswith(prefix):
        return message
    for k, value in enumerate(argv[1:], start=1):
        if value in message[len(prefix):] and argv[k - 1].startswith("--") and value.startswith("-"):
            flag = argv[k - 1].split("=")[0]
            return (f"{flag} {value}: a value that starts with '-' is read as another flag; write {flag}={value} "
                    f"(and check that the value suits {flag})")
    return message


def _first_step():
    """A Trainer callback that knows whether training took its first step: an error before it is a mistake in
    the command line (transformers is imported here, as by the rest of ``tikmix train``, not by ``tikmix``)."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        reached = False

        def on_step_begin(self, args, state, control, **kwargs):
            self.reached = True

    return FirstStep()


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(argv: list[str]) -> int:
    parser = _train_parser()
    argv = _inject_new_model_defaults(_inject_distributed_defaults(argv))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # the dataclasses' own checks (TrainingArguments, --tikmix_* values)
        raise UsageError(_unused_hint(str(err), argv)) from None
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise UsageError(
            f"--max_steps {training_args.max_steps}: the training stream (a DomainMixture) is endless, so training "
            "needs a positive --max_steps, e.g. --max_steps 1000"
        )
    if data_args.block_size < 2:
        raise UsageError(f"--block_size {data_args.block_size}: give at least 2 tokens per block")
    if not data_args.domain:
        raise UsageError("no training domains: give --domain NAME=PATH (repeatable) or --domains domains.yaml")
    domains = parse_sources(data_args.domain, "--domain")
    validation = parse_sources(data_args.validation, "--validation")
    if not validation and not data_args.static_mixture:
        raise UsageError(
            "no validation tasks: TiKMiX measures influence on them; give --validation NAME=PATH, or "
            "--static_mixture to train without TiKMiX"
        )
    weights = parse_weights(data_args.mixture_weights, "--mixture_weights")
    if model_args.model_name_or_path and model_args.model_config:
        raise UsageError("--model_name_or_path and --model_config both given: use one (a saved model, or a new one)")
    if model_args.model_name_or_path:
        check_folder(model_args.model_name_or_path, "--model_name_or_path", "a folder written by save_pretrained")
    if model_args.tokenizer_name_or_path:
        check_folder(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path", "a tokenizer folder")
    config_spec = model_config_spec(model_args.model_config)

    from transformers import Trainer, default_data_collator, set_seed

    from ..callback import TiKMiXCallback
    from ..mixture import DomainMixture

    set_seed(training_args.seed)
    texts = {name: load_texts(s, data_args.text_column) for name, s in domains.items()}
    val_texts = {name: load_texts(s, data_args.text_column) for name, s in validation.items()}
    tokenizer = build_tokenizer(model_args, training_args, texts)
    model = build_model(model_args, config_spec, tokenizer, data_args.block_size, training_args.seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and data_args.block_size > max_positions:
        raise UsageError(
            f"--block_size {data_args.block_size} is longer than the model's max_position_embeddings={max_positions}; "
            f"use --block_size {max_positions} or less"
        )
    blocks = pack_all(texts, tokenizer, data_args.block_size, domains)
    val_blocks = pack_all(val_texts, tokenizer, data_args.block_size, validation)
    try:
        mixture = DomainMixture(blocks, weights=weights, seed=training_args.seed)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--mixture_weights {data_args.mixture_weights}: {err}") from None
    tikmix = None if data_args.static_mixture else TiKMiXCallback(
        mixture, val_blocks, training_args.tikmix_config(), collator=default_data_collator)
    evaluate = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    trainer = Trainer(
        model=model, args=training_args, train_dataset=mixture,
        eval_dataset=val_blocks if evaluate and val_blocks else None, data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=[tikmix] if tikmix is not None else [],
    )
    if tikmix is not None:
        tikmix.bind(trainer)
    if _is_main():
        rows = [(n, len(b), f"{mixture.weights[n]:.3f}") for n, b in blocks.items()]
        print(f"tikmix train: {sum(p.numel() for p in model.parameters()):,} parameters, {len(blocks)} domains "
              f"({', '.join(f'{n}: {k} blocks, w={w}' for n, k, w in rows)}), validation {list(val_blocks)}, "
              f"world size {training_args.world_size}, learning rate {training_args.learning_rate:g} "
              f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)})", flush=True)
    started = _first_step()
    trainer.add_callback(started)
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except (ValueError, FileNotFoundError, ImportError) as err:
        if started.reached:
            raise  # a failure while training is not a mistake in the command line: its traceback is the record
        # What TiKMiX checks when training starts (the schedule file, initial weights that name unknown domains,
        # the reference model's folder...) is part of the command line too.
        raise UsageError(str(err)) from None
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        final = mixture.weights
        print("tikmix train: final mixture " + ", ".join(f"{d}={w:.3f}" for d, w in final.items()))
        if tikmix is not None:
            print(f"tikmix train: history in {os.path.join(training_args.output_dir, 'tikmix', 'history.json')}; "
                  f"pictures: tikmix plot {training_args.output_dir}")
    shutdown_distributed()
    return 0


def shutdown_distributed() -> None:
    """Destroy the process group, once every rank is done, before the interpreter exits.

    A gloo group left to the interpreter's own teardown can abort a rank ("terminate called
    without an active exception", SIGABRT) after all its work is written, which torchrun reports
    as a failed run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
