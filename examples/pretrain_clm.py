#!/usr/bin/env python
"""Pre-train a causal language model on a mixture of text domains that TiKMiX re-mixes while it trains.

Written in the style of transformers' ``examples/pytorch/language-modeling/run_clm.py``: the same
argument classes and the same tokenise-then-group pipeline, with three changes, each marked ``TiKMiX``:

1. the training set is ``tikmix_hf.interleave_datasets`` of the domains, where a ``datasets`` pipeline
   calls ``datasets.interleave_datasets`` (the same arguments; it returns a ``DomainMixture`` whose
   weights can change while training runs);
2. ``TiKMiXTrainingArguments`` (``TrainingArguments`` plus every ``--tikmix_*`` flag) replaces
   ``TrainingArguments``;
3. a ``TiKMiXCallback`` measures each domain's influence on the validation tasks at stage boundaries and
   sets the new weights.

One process (CPU or one GPU)::

    python examples/pretrain_clm.py --output_dir runs/clm \\
        --domain code=data/code/ --domain web=data/web.jsonl --domain papers=data/papers.parquet \\
        --validation held_out_code=data/val_code.txt \\
        --config_name configs/llama_100m.json --tokenizer_name tokenizer/ \\
        --block_size 1024 --per_device_train_batch_size 8 --max_steps 20000 --learning_rate 6e-4 \\
        --bf16 --tikmix_stage_fractions 0.05 0.25 0.5 0.75

Several GPUs: ``accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/pretrain_clm.py ...``
(DDP; ``examples/accelerate/fsdp.yaml`` for FSDP). Each domain is a file or a folder of ``.txt``, ``.json``,
``.jsonl`` or ``.parquet`` files, read with ``datasets.load_dataset``; ``--streaming`` reads the training
domains shard by shard instead of loading them whole. The model is a local folder (``--model_name_or_path``)
or a new one from a config file (``--config_name``) with a tokenizer folder (``--tokenizer_name``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    default_data_collator,
    set_seed,
)

from tikmix_hf import (
    TiKMiXCallback,  # TiKMiX (3)
    TiKMiXTrainingArguments,  # TiKMiX (2)
    interleave_datasets,  # TiKMiX (1): was `from datasets import interleave_datasets`
)

logger = logging.getLogger(__name__)

#: File suffix -> the ``datasets`` builder that reads it.
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class ModelArguments:
    """Which model and tokenizer to train (local folders and files: nothing is downloaded)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A model folder written by save_pretrained, to continue pre-training."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "A config.json (or a folder with one) for a new model, trained from scratch."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A tokenizer folder; default: the model's (--model_name_or_path)."}
    )
    torch_dtype: str | None = field(
        default=None, metadata={"help": "Load the model in this dtype (auto, bfloat16, float16, float32)."}
    )


@dataclass
class DataTrainingArguments:
    """The training domains, the validation tasks, and how text becomes blocks."""

    domain: list[str] = field(
        default_factory=list,
        metadata={"help": "A training domain, NAME=PATH (repeatable): a .txt/.json/.jsonl/.parquet file or a folder "
                          "of them.", "action": "extend", "nargs": "+"},
    )
    validation: list[str] = field(
        default_factory=list,
        metadata={"help": "A validation task, NAME=PATH (repeatable), read like a domain; TiKMiX mixes for them.",
                  "action": "extend", "nargs": "+"},
    )
    domain_weights: list[float] | None = field(
        default=None, metadata={"help": "The starting weights, one per --domain (default: uniform).", "nargs": "+"}
    )
    text_column: str = field(default="text", metadata={"help": "The text column of .json/.jsonl/.parquet rows."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per training block (documents are joined)."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training domains shard by shard instead of loading them."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenising the loaded (not streamed) datasets."}
    )

    def __post_init__(self):
        if not self.domain:
            raise ValueError("give the training domains: --domain NAME=PATH (repeatable)")
        if not self.validation:
            raise ValueError("give the validation tasks TiKMiX mixes for: --validation NAME=PATH (repeatable)")
        if self.domain_weights is not None and len(self.domain_weights) != len(self.domain):
            raise ValueError(f"--domain_weights has {len(self.domain_weights)} values for {len(self.domain)} "
                             "domains; give one per --domain")


def named_paths(items: list[str], flag: str) -> dict[str, Path]:
    """``NAME=PATH`` items as ``{name: path}``; the error names the flag and the item."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: write NAME=PATH, e.g. {flag} code=data/code/")
        if name in out:
            raise ValueError(f"{flag} {name!r} is given twice")
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag} {name}={path}: no such file or folder")
        out[name] = Path(path)
    return out


def load_domain(path: Path, text_column: str, streaming: bool):
    """One domain as a ``datasets`` dataset of one text column: a file, or every readable file of a folder."""
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS) if path.is_dir() else [path]
    builders = {BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) > 1:
        raise ValueError(f"{path}: give one kind of file ({', '.join(sorted(BUILDERS))}), or a folder of one kind; "
                         f"found {sorted({p.suffix for p in files}) or 'none'}")
    builder = builders.pop()
    data = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=streaming)
    column = "text" if builder == "text" else text_column
    names = data.column_names or list(next(iter(data)))  # a stream over several files says after its first row
    if column not in names:
        raise ValueError(f"{path}: no column {column!r} (it has {names}); pass --text_column")
    data = data.select_columns([column])
    return data if column == "text" else data.rename_column(column, "text")


def tokenize_and_group(data, tokenizer, block_size: int, num_proc: int | None):
    """run_clm's pipeline: tokenise, join every document (eos after each), cut ``block_size`` blocks."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def group(batch):
        joined = list(chain(*batch["input_ids"]))
        total = len(joined) // block_size * block_size
        blocks = [joined[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    kw = {} if isinstance(data, datasets.IterableDataset) else {"num_proc": num_proc}
    tokens = data.map(tokenize, batched=True, remove_columns=["text"], **kw)
    return tokens.map(group, batched=True, remove_columns=["input_ids"], **kw)


def build_model(model_args: ModelArguments):
    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                     dtype=model_args.torch_dtype or "auto")
    elif model_args.config_name and model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        config = AutoConfig.from_pretrained(model_args.config_name)
        model = AutoModelForCausalLM.from_config(config)
        logger.info("training a new model from scratch: %.1fM parameters",
                    sum(p.numel() for p in model.parameters()) / 1e6)
    else:
        raise ValueError("give --model_name_or_path (a saved model), or --config_name and --tokenizer_name (a new "
                         "model)")
    return model, tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TiKMiXTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):  # every flag in one JSON file, as run_clm.py takes them
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("--max_steps: the mixture is a stream without end, so give the number of optimizer steps")

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    model, tokenizer = build_model(model_args)
    block_size = min(data_args.block_size, getattr(model.config, "max_position_embeddings", data_args.block_size))
    domains = named_paths(data_args.domain, "--domain")
    tasks = named_paths(data_args.validation, "--validation")
    with training_args.main_process_first(desc="tokenising"):
        train_domains = {name: tokenize_and_group(load_domain(path, data_args.text_column, data_args.streaming),
                                                  tokenizer, block_size, data_args.preprocessing_num_workers)
                         for name, path in domains.items()}
        validation = {name: tokenize_and_group(load_domain(path, data_args.text_column, False), tokenizer,
                                               block_size, data_args.preprocessing_num_workers)
                      for name, path in tasks.items()}
    for name, data in validation.items():
        if len(data) == 0:
            raise ValueError(f"--validation {name}: shorter than one block of {block_size} tokens; lower --block_size")

    # TiKMiX (1): the one-line change. datasets.interleave_datasets takes the same arguments.
    train_dataset = interleave_datasets(list(train_domains.values()), probabilities=data_args.domain_weights,
                                        seed=training_args.seed, stopping_strategy="all_exhausted",
                                        names=list(train_domains))
    # TiKMiX (3): the callback measures each domain's influence on the validation tasks at stage boundaries.
    callback = TiKMiXCallback(train_dataset, validation, config=training_args.tikmix_config())
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                      data_collator=default_data_collator, processing_class=tokenizer, callbacks=[callback])
    callback.bind(trainer)

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.warning("final mixture: %s; every decision is in %s", train_dataset.weights,
                       os.path.join(training_args.output_dir, "tikmix", "history.json"))
    return train_dataset.weights


if __name__ == "__main__":
    main()
