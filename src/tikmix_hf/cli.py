"""The ``tikmix`` command line.

``tikmix demo``
    The main job: TiKMiX-D and TiKMiX-M against a static mixture on an embedded corpus, at equal
    training tokens (:func:`tikmix_hf.demo.run_demo`).
``tikmix train``
    A ``run_clm``-style training script: ``HfArgumentParser`` over :class:`ModelArguments`,
    :class:`DataArguments` and :class:`~tikmix_hf.TiKMiXTrainingArguments`, so every
    ``TrainingArguments`` flag and every ``--tikmix_*`` flag works. Launch it with ``torchrun`` or
    ``accelerate launch`` (``python -m tikmix_hf.cli train ...``) for several processes.
``tikmix plot``
    The pictures (and tables) of a ``history.json``, a run folder or a demo ``results.json``.
``tikmix influence``
    One-shot Group Influence of some domains on some validation sets for a saved model, and the
    TiKMiX-D mixture it recommends.

Domains and validation sets are given as ``NAME=PATH`` (a text file, a ``.jsonl``/``.json`` file of
rows with a text column, or a folder of such files), as a YAML/JSON mapping file, or inline JSON::

    # domains.yaml
    code: data/code/                        # a folder: every text/jsonl file in it, recursively
    web: data/web.jsonl                     # rows {"text": ...}
    wiki: {dataset: wikitext, config: wikitext-2-raw-v1, split: train, column: text}   # datasets
    saved: {dataset: data/saved_dataset}    # a folder written by Dataset.save_to_disk

Mistakes in the command line or in these files print one message (the argument, the value and
what to do instead) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataArguments", "ModelArguments", "UsageError", "main"]

USAGE_EXIT = 2
MAPPING_SUFFIXES = (".yaml", ".yml", ".json")
ROW_SUFFIXES = (".jsonl", ".json")
DATASET_KEYS = {"dataset", "config", "split", "column", "data_files", "data_dir"}
MODEL_PRESETS = {
    "tiny": dict(hidden_size=64, layers=2, heads=4),
    "small": dict(hidden_size=128, layers=4, heads=4),
}


class UsageError(Exception):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# Domain and validation sources
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """Where the text of one domain or validation set comes from."""

    name: str
    origin: str  # how the user gave it, for messages: "--domain code=data/code"
    path: Path | None = None
    dataset: dict | None = None


_SOURCE_FIX = (
    "give NAME=PATH (a text file, a .jsonl/.json file of rows, or a folder of them), a YAML/JSON mapping file "
    "NAME: PATH, or inline JSON '{\"NAME\": \"PATH\"}'"
)


def parse_sources(values: Sequence[str], flag: str) -> dict[str, Source]:
    """``NAME=PATH`` items, mapping files and inline JSON mappings, merged into ``{name: Source}``.

    Every path is checked now, so a typo fails before any model is built.
    """
    sources: dict[str, Source] = {}

    def add(source: Source) -> None:
        if source.name in sources:
            raise UsageError(
                f"{source.origin}: the name {source.name!r} is already given by {sources[source.name].origin}; "
                "every name must be unique"
            )
        sources[source.name] = source

    for value in values:
        value = str(value)
        if value.lstrip().startswith("{"):
            try:
                mapping = json.loads(value)
            except json.JSONDecodeError as err:
                raise UsageError(f"{flag} {value!r}: not valid JSON ({err}); {_SOURCE_FIX}") from None
            for source in _mapping_sources(mapping, f"{flag} (inline JSON)", Path.cwd()):
                add(source)
            continue
        path = Path(value)
        name, sep, spec = value.partition("=")
        if not (sep and os.sep not in name):
            if path.is_file() and path.suffix.lower() in MAPPING_SUFFIXES:
                for source in _mapping_sources(_read_mapping_file(path, flag), f"{flag} {value}", path.parent):
                    add(source)
                continue
            if path.exists():
                raise UsageError(
                    f"{flag} {value}: a path without a name; write {flag} NAME={value} "
                    "(or use a YAML/JSON mapping file)"
                )
            raise UsageError(f"{flag} {value}: no such file, and not NAME=PATH; {_SOURCE_FIX}")
        name, spec = name.strip(), spec.strip()
        origin = f"{flag} {value}"
        if not name:
            raise UsageError(f"{origin}: the name before '=' is empty; write {flag} NAME={spec}")
        if not spec:
            raise UsageError(f"{origin}: the path after '=' is empty; write {flag} {name}=PATH")
        add(_path_source(name, spec, origin, Path.cwd()))
    return sources


def _read_mapping_file(path: Path, flag: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{flag} {path}: not valid JSON ({err}); {_SOURCE_FIX}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"{flag} {path}: not valid YAML{at} ({problem}); {_SOURCE_FIX}") from None


def _mapping_sources(mapping: Any, origin: str, base: Path) -> list[Source]:
    if not isinstance(mapping, Mapping) or not mapping:
        kind = "an empty mapping" if isinstance(mapping, Mapping) else f"a {type(mapping).__name__}"
        raise UsageError(f"{origin}: expected a mapping of names to sources, got {kind}; {_SOURCE_FIX}")
    out = []
    for name, spec in mapping.items():
        where = f"{origin}: {name}"
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{origin}: names must be non-empty strings, got {name!r}")
        if isinstance(spec, str):
            out.append(_path_source(name, spec, where, base))
        elif isinstance(spec, Mapping):
            out.append(_dict_source(name, dict(spec), where, base))
        else:
            raise UsageError(
                f"{where}: expected a path or a mapping such as {{dataset: NAME, split: train, column: text}}, "
                f"got {spec!r}"
            )
    return out


def _path_source(name: str, spec: str, origin: str, base: Path) -> Source:
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise UsageError(f"{origin}: no such file or folder {path}; {_SOURCE_FIX}")
    return Source(name, origin, path=path)


def _dict_source(name: str, spec: dict, origin: str, base: Path) -> Source:
    if set(spec) == {"path"}:
        return _path_source(name, str(spec["path"]), origin, base)
    unknown = sorted(set(spec) - DATASET_KEYS)
    if unknown or "dataset" not in spec:
        raise UsageError(
            f"{origin}: {'unknown keys ' + str(unknown) if unknown else 'no dataset key'}; a dataset source is "
            f"{{dataset: NAME_OR_FOLDER, config: ..., split: train, column: text}} (keys {sorted(DATASET_KEYS)}), "
            "a file or folder is {path: PATH}"
        )
    if not isinstance(spec["dataset"], str) or not spec["dataset"]:
        raise UsageError(f"{origin}: dataset must be a non-empty string, got {spec['dataset']!r}")
    local = Path(os.path.expanduser(spec["dataset"]))
    local = local if local.is_absolute() else base / local
    if local.exists():
        spec["dataset"] = str(local)
    return Source(name, origin, dataset=spec)


def _text_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root, n) for n in sorted(names) if not n.startswith("."))
    return files


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as fh:
        return b"\0" in fh.read(8192)


def load_texts(source: Source, text_column: str = "text") -> list[str]:
    """The documents of one source: a file (one document, or one per row of a ``.jsonl``/``.json``),
    a folder of files (binary files skipped), or a ``datasets`` dataset's text column."""
    if source.dataset is not None:
        docs = _dataset_texts(source, text_column)
    elif source.path.is_dir():
        docs = []
        for path in _text_files(source.path):
            if path.suffix.lower() in ROW_SUFFIXES:
                docs.extend(_row_texts(path, source, text_column))
            elif not _is_binary(path):
                docs.append(path.read_text(encoding="utf-8", errors="replace"))
    elif source.path.suffix.lower() in ROW_SUFFIXES:
        docs = _row_texts(source.path, source, text_column)
    else:
        docs = [source.path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"{source.origin}: no text found (empty files, or no text files in the folder)")
    return docs


def _row_texts(path: Path, source: Source, column: str) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{source.origin}: {path} line {number} is not valid JSON ({err.msg})") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{source.origin}: {path} is not valid JSON ({err})") from None
        if isinstance(rows, Mapping) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise UsageError(f"{source.origin}: {path} must hold a list of rows (or of strings)")
    docs = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, Mapping) and isinstance(row.get(column), str):
            docs.append(row[column])
        else:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise UsageError(
                f"{source.origin}: row {number} of {path} has no text column {column!r} (it has {keys}); "
                "pass --text_column NAME"
            )
    return docs


def _dataset_texts(source: Source, default_column: str) -> list[str]:
    import datasets

    spec = source.dataset
    column = spec.get("column", default_column)
    name = spec["dataset"]
    try:
        local = Path(name)
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                split = spec.get("split", "train")
                if split not in data:
                    raise UsageError(f"{source.origin}: {name} has splits {list(data)}, not {split!r}; set split:")
                data = data[split]
        else:
            data = datasets.load_dataset(
                name, spec.get("config"), split=spec.get("split", "train"), data_files=spec.get("data_files"),
                data_dir=spec.get("data_dir"),
            )
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        raise UsageError(
            f"{source.origin}: cannot load dataset {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
            "without network only local files and folders, Dataset.save_to_disk folders and datasets already in "
            "the cache work"
        ) from None
    if column not in data.column_names:
        raise UsageError(
            f"{source.origin}: dataset {name!r} has no column {column!r} (it has {data.column_names}); set column:"
        )
    return [t for t in data[column] if isinstance(t, str)]


def _pack_all(texts: Mapping[str, list[str]], tokenizer, block_size: int, sources: Mapping[str, Source]) -> dict:
    from .corpora import pack_blocks

    packed = {}
    for name, docs in texts.items():
        blocks = pack_blocks(docs, tokenizer, block_size)
        if len(blocks) == 0:
            raise UsageError(
                f"{sources[name].origin}: its text is shorter than one block of {block_size} tokens; give more text "
                "or a smaller --block_size"
            )
        packed[name] = blocks
    return packed


def _parse_weights(value: str, flag: str) -> str | dict:
    if value in ("natural", "uniform"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UsageError(
            f"{flag} {value!r}: use natural, uniform or a JSON mapping such as '{{\"code\": 0.6, \"web\": 0.4}}'"
        )
    return parsed


# ------------------------------------------------------------------------------------------------
# tikmix train
# ------------------------------------------------------------------------------------------------

@dataclass
class ModelArguments:
    """Which model and tokenizer ``tikmix train`` starts from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A local model folder (save_pretrained) to continue training from."}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "A new model: a config JSON file (with model_type; Llama without it) or a preset "
                          f"({', '.join(MODEL_PRESETS)}). Default: tiny, when --model_name_or_path is not given."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local tokenizer folder. Default: the model's, or a byte-level BPE trained on the domains."},
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the tokenizer trained on the domains."})


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

    from .training_args import TiKMiXTrainingArguments

    return HfArgumentParser((ModelArguments, DataArguments, TiKMiXTrainingArguments), prog="tikmix train")


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


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(argv: list[str]) -> int:
    parser = _train_parser()
    argv = _inject_distributed_defaults(argv)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # the dataclasses' own checks (TrainingArguments, --tikmix_* values)
        raise UsageError(str(err)) from None
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
    weights = _parse_weights(data_args.mixture_weights, "--mixture_weights")
    if model_args.model_name_or_path and model_args.model_config:
        raise UsageError("--model_name_or_path and --model_config both given: use one (a saved model, or a new one)")
    if model_args.model_name_or_path:
        _check_folder(model_args.model_name_or_path, "--model_name_or_path", "a folder written by save_pretrained")
    if model_args.tokenizer_name_or_path:
        _check_folder(model_args.tokenizer_name_or_path, "--tokenizer_name_or_path", "a tokenizer folder")
    config_spec = _model_config_spec(model_args.model_config)

    from transformers import Trainer, default_data_collator, set_seed

    from .callback import TiKMiXCallback
    from .mixture import DomainMixture

    set_seed(training_args.seed)
    texts = {name: load_texts(s, data_args.text_column) for name, s in domains.items()}
    val_texts = {name: load_texts(s, data_args.text_column) for name, s in validation.items()}
    tokenizer = _tokenizer(model_args, training_args, texts)
    model = _model(model_args, config_spec, tokenizer, data_args.block_size, training_args.seed)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and data_args.block_size > max_positions:
        raise UsageError(
            f"--block_size {data_args.block_size} is longer than the model's max_position_embeddings={max_positions}; "
            f"use --block_size {max_positions} or less"
        )
    blocks = _pack_all(texts, tokenizer, data_args.block_size, domains)
    val_blocks = _pack_all(val_texts, tokenizer, data_args.block_size, validation)
    try:
        mixture = DomainMixture(blocks, weights=weights, seed=training_args.seed)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--mixture_weights {data_args.mixture_weights}: {err}") from None
    callbacks = []
    if not data_args.static_mixture:
        callbacks.append(TiKMiXCallback(mixture, val_blocks, training_args.tikmix_config(),
                                        collator=default_data_collator))
    evaluate = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    trainer = Trainer(
        model=model, args=training_args, train_dataset=mixture,
        eval_dataset=val_blocks if evaluate and val_blocks else None, data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=callbacks,
    )
    for callback in callbacks:
        callback.bind(trainer)
    if _is_main():
        rows = [(n, len(b), f"{mixture.weights[n]:.3f}") for n, b in blocks.items()]
        print(f"tikmix train: {sum(p.numel() for p in model.parameters()):,} parameters, {len(blocks)} domains "
              f"({', '.join(f'{n}: {k} blocks, w={w}' for n, k, w in rows)}), validation {list(val_blocks)}, "
              f"world size {training_args.world_size}", flush=True)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        final = mixture.weights
        print("tikmix train: final mixture " + ", ".join(f"{d}={w:.3f}" for d, w in final.items()))
        if callbacks:
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


def _check_folder(value: str, flag: str, what: str) -> None:
    if not Path(value).is_dir():
        raise UsageError(
            f"{flag} {value}: no such folder; give {what} (models are loaded from local folders only, nothing is "
            "downloaded)"
        )


def _model_config_spec(value: str | None) -> dict | str | None:
    if value is None or value in MODEL_PRESETS:
        return value
    path = Path(value)
    if not path.is_file():
        raise UsageError(
            f"--model_config {value}: neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing config JSON file"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--model_config {value}: not a readable JSON file ({err})") from None
    if not isinstance(spec, dict):
        raise UsageError(
            f"--model_config {value}: expected a JSON object of config fields, got {type(spec).__name__}"
        )
    return spec


def _tokenizer(model_args: ModelArguments, training_args, texts: Mapping[str, list[str]]):
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source:
        tokenizer = _load_tokenizer(source, "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path
                                    else "--model_name_or_path")
    else:
        from .corpora import train_tokenizer

        # One process trains and saves it; the others load that copy, so every rank has the same vocabulary.
        folder = os.path.join(training_args.output_dir, "tokenizer")
        with training_args.main_process_first(desc="training the tokenizer"):
            if training_args.process_index == 0:
                tokenizer = train_tokenizer(texts, vocab_size=model_args.vocab_size, seed=training_args.seed)
                tokenizer.save_pretrained(folder)
            else:
                tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer from {source} has no eos token, which packing puts between documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer(source: str, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(
            f"{flag} {source}: no tokenizer could be loaded from it ({str(err).splitlines()[0][:200]}); give a folder "
            "written by tokenizer.save_pretrained (e.g. --tokenizer_name_or_path PATH)"
        ) from None


def _model(model_args: ModelArguments, spec, tokenizer, block_size: int, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from .corpora import tiny_llama

    if model_args.model_name_or_path:
        return _load_model(model_args.model_name_or_path, "--model_name_or_path")
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    if spec is None or isinstance(spec, str):
        return tiny_llama(len(tokenizer), block_size=block_size, seed=seed, **MODEL_PRESETS[spec or "tiny"], **ids)
    settings = {**spec, "vocab_size": len(tokenizer), **ids}
    settings.setdefault("max_position_embeddings", block_size)
    try:
        model_type = settings.pop("model_type", None)
        config = AutoConfig.for_model(model_type, **settings) if model_type else LlamaConfig(**settings)
    except (TypeError, ValueError, KeyError) as err:
        raise UsageError(f"--model_config {model_args.model_config}: not a usable config ({err})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _load_model(path: str, flag: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(
            f"{flag} {path}: no causal language model could be loaded from it ({str(err).splitlines()[0][:200]}); "
            "give a folder written by model.save_pretrained (config.json and the weights)"
        ) from None


# ------------------------------------------------------------------------------------------------
# tikmix demo
# ------------------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import ARMS, SIZES, run_demo

    if args.size is not None and args.size not in SIZES:
        raise UsageError(f"--size {args.size}: use one of {list(SIZES)}")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise UsageError(f"--arms {' '.join(args.arms)}: unknown arm(s) {unknown}; use any of {list(ARMS)}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct non-negative integers, e.g. 0 1 2")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a positive number")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a folder; give a folder to write into")
    run_demo(corpus=args.corpus, quick=args.quick, output_dir=out, seeds=args.seeds, arms=args.arms, size=args.size,
             threads=args.threads, show_progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------------------------
# tikmix plot
# ------------------------------------------------------------------------------------------------

def _resolve_history(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        for candidate in (path / "tikmix" / "history.json", path / "history.json", path / "results.json"):
            if candidate.is_file():
                return candidate
        raise UsageError(
            f"HISTORY {value}: a folder without tikmix/history.json, history.json or results.json; give the "
            "history.json that TiKMiXCallback writes to <output_dir>/tikmix/, or that output_dir"
        )
    if not path.is_file():
        raise UsageError(
            f"HISTORY {value}: no such file; give the history.json that TiKMiXCallback writes to "
            "<output_dir>/tikmix/history.json (or the run's output_dir, or a demo results.json)"
        )
    return path


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError) as err:
        raise UsageError(f"{label} {path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{label} {path}: not valid JSON ({err}); it may be truncated") from None


def _run_dir_state(history_path: Path) -> dict | None:
    """``trainer_state.json`` of the run that wrote this history (its ``output_dir``), if any."""
    run_dir = history_path.parent.parent if history_path.parent.name == "tikmix" else history_path.parent
    state = run_dir / "trainer_state.json"
    if state.is_file():
        try:
            return json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _eval_curves(state: Mapping | None) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in (state or {}).get("log_history", []):
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss") and isinstance(value, (int, float)):
                task = key[len("eval_"):-len("_loss")] or "eval"
                curves.setdefault(task, []).append((int(entry.get("step", 0)), float(value)))
    return curves


def cmd_plot(args: argparse.Namespace) -> int:
    path = _resolve_history(args.history)
    doc = _read_json(path, "HISTORY")
    out = Path(args.output_dir) if args.output_dir else path.parent / "plots"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a folder")

    from . import plots as P
    from .history import HISTORY_FORMAT
    from .report import history_report

    if isinstance(doc, dict) and str(doc.get("format", "")).startswith("tikmix_hf.demo/"):
        from .demo import draw_results

        missing = [r["history"] for r in doc.get("runs", [])
                   if r.get("history") and not (path.parent / r["history"]).is_file()]
        if missing:
            raise UsageError(
                f"HISTORY {path}: the demo's run histories are gone ({path.parent / missing[0]} ...); rerun tikmix demo"
            )
        paths = draw_results(doc, out, base=path.parent)
    else:
        if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT:
            raise UsageError(
                f"HISTORY {path}: not a TiKMiX history (expected format {HISTORY_FORMAT!r}); give the history.json "
                "that TiKMiXCallback writes to <output_dir>/tikmix/"
            )
        for key in ("domains", "stages"):
            if not isinstance(doc.get(key), list):
                raise UsageError(f"HISTORY {path}: the history has no {key} list; it is damaged")
        state = _run_dir_state(path)
        total = args.total_steps or (state or {}).get("max_steps") or None
        try:
            paths = P.plot_history(doc, out, total_steps=total)
        except (KeyError, ValueError, TypeError) as err:
            raise UsageError(
                f"HISTORY {path}: cannot draw it ({type(err).__name__}: {err}); the file is damaged"
            ) from None
        curves = _eval_curves(state)
        if curves:
            paths.append(P.plot_validation_curves({"this run": curves}, out / "validation.png"))
        (out / "history.md").write_text(history_report(doc, title=f"TiKMiX history of {path}"))
        print(f"{len(doc['stages'])} stage(s), {len(doc['domains'])} domains; tables in {out / 'history.md'}")
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------------------------------------
# tikmix influence
# ------------------------------------------------------------------------------------------------

def cmd_influence(args: argparse.Namespace) -> int:
    import numpy as np

    from .report import markdown_table

    if not args.domains:
        raise UsageError("--domains: give the domains to measure (NAME=PATH ..., or a YAML/JSON mapping file)")
    if not args.validation:
        raise UsageError("--validation: give the validation sets (NAME=PATH ..., or a YAML/JSON mapping file)")
    for flag, value in (("--probe-sequences", args.probe_sequences), ("--validation-sequences",
                        args.validation_sequences), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give a positive integer")
    _check_folder(args.model, "--model", "a folder written by model.save_pretrained")
    if args.tokenizer:
        _check_folder(args.tokenizer, "--tokenizer", "a tokenizer folder")
    domains = parse_sources(args.domains, "--domains")
    validation = parse_sources(args.validation, "--validation")
    prior_spec = _parse_weights(args.prior, "--prior")
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"--output {output}: a folder; give a file name such as {output / 'influence.json'}")

    import torch
    from transformers import default_data_collator

    from ._io import save_json_atomic
    from .influence import group_influence
    from .mixture import DomainMixture
    from .solvers import solve_direct

    model = _load_model(args.model, "--model")
    tokenizer = _load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {args.tokenizer or args.model} has no eos token, which packing needs")
    max_positions = getattr(model.config, "max_position_embeddings", None) or args.block_size or 128
    block = args.block_size or min(128, max_positions)
    if block > max_positions:
        raise UsageError(f"--block-size {block}: longer than the model's max_position_embeddings={max_positions}")
    blocks = _pack_all({n: load_texts(s, args.text_column) for n, s in domains.items()}, tokenizer, block, domains)
    val_blocks = _pack_all({n: load_texts(s, args.text_column) for n, s in validation.items()}, tokenizer, block,
                           validation)
    try:
        mixture = DomainMixture(blocks, weights=prior_spec, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--prior {args.prior}: {err}") from None

    def batches(examples):
        size = args.batch_size
        return [default_data_collator(examples[i : i + size]) for i in range(0, len(examples), size)]

    rng = np.random.default_rng(args.seed)
    domain_batches = {d: batches(mixture.probe(d, args.probe_sequences)) for d in blocks}
    validation_batches = {}
    for name, data in val_blocks.items():
        idx = rng.permutation(len(data))[: args.validation_sequences]
        validation_batches[name] = batches([data[int(i)] for i in idx])
    model.train()
    with torch.random.fork_rng(devices=[]):
        result = group_influence(model, domain_batches, validation_batches, preconditioner=args.preconditioner,
                                 seed=args.seed, show_progress=not args.no_progress)
    prior = np.array([mixture.weights[d] for d in mixture.domains])
    solved = solve_direct(result.scores, prior, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                          pareto=not args.no_pareto, domains=list(result.domain_names), tasks=list(result.task_names))
    recommended = solved.as_mapping()
    S = result.scores
    rows = [[d] + [f"{S[i, j]:.4g}" for i in range(len(result.task_names))]
            + [f"{prior[j]:.3f}", f"{recommended[d]:.3f}"] for j, d in enumerate(result.domain_names)]
    print(markdown_table(["domain"] + [f"S[{t}]" for t in result.task_names] + ["prior", "TiKMiX-D"], rows))
    print(f"solver: {solved.status}: {solved.message}")
    doc = {
        "format": "tikmix_hf.influence/1",
        "model": str(Path(args.model).resolve()),
        "block_size": block,
        "probe_sequences": args.probe_sequences,
        "validation_sequences": args.validation_sequences,
        "influence": result.to_dict(),
        "prior": dict(zip(mixture.domains, map(float, prior))),
        "recommended_weights": recommended,
        "solver_result": solved.to_dict(),
    }
    save_json_atomic(output, doc)
    print(f"wrote {output}")
    return 0


# ------------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tikmix", description="TiKMiX dynamic data mixing for Hugging Face Trainer (arXiv 2508.17677).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,plot,influence,schedule}")

    demo = sub.add_parser("demo", help="TiKMiX against a static mixture on an embedded corpus (the main job).",
                          description="Train static, TiKMiX-D and TiKMiX-M arms side by side at equal training "
                                      "tokens and write report.md, results.json and pictures.")
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes instead of about 10)")
    demo.add_argument("--corpus", choices=("local", "synthetic"), default="local",
                      help="local: real text found on this machine (default); synthetic: domains with known roles")
    demo.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/demo",
                      help="where results.json, report.md and plots/ go (default: runs/demo)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="model seeds, e.g. --seeds 0 1 2")
    demo.add_argument("--arms", nargs="+", default=["static", "tikmix_d", "tikmix_m"],
                      help="any of static, uniform, tikmix_d, tikmix_m (default: static tikmix_d tikmix_m)")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see docs/demo.md)")
    demo.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                      help="no progress bars")
    demo.add_argument("--size", default=None, help=argparse.SUPPRESS)  # tiny: for tests
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("train", add_help=False,
                   help="train with TiKMiX: run_clm-style HfArgumentParser flags (tikmix train --help)")

    plot = sub.add_parser("plot", help="pictures of a history.json (or a run folder, or a demo results.json)")
    plot.add_argument("history", metavar="HISTORY", help="<output_dir>/tikmix/history.json, its output_dir, or a "
                                                         "demo results.json")
    plot.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                      help="where the PNGs go (default: plots/ next to the history)")
    plot.add_argument("--total-steps", "--total_steps", dest="total_steps", type=int, default=None,
                      help="the run's max_steps (default: from trainer_state.json, else guessed from the stages)")
    plot.set_defaults(func=cmd_plot)

    inf = sub.add_parser("influence", help="one-shot influence matrix and TiKMiX-D mixture for a saved model")
    inf.add_argument("--model", required=True, help="a folder written by model.save_pretrained")
    inf.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the model's folder)")
    inf.add_argument("--domains", "--domain", dest="domains", nargs="+", action="extend", default=[],
                     help="NAME=PATH ..., a YAML/JSON mapping file, or inline JSON")
    inf.add_argument("--validation", nargs="+", action="extend", default=[], help="validation sets, like --domains")
    inf.add_argument("--text-column", "--text_column", dest="text_column", default="text")
    inf.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=None,
                     help="tokens per block (default: min(128, the model's max_position_embeddings))")
    inf.add_argument("--probe-sequences", "--probe_sequences", dest="probe_sequences", type=int, default=16)
    inf.add_argument("--validation-sequences", "--validation_sequences", dest="validation_sequences", type=int,
                     default=16)
    inf.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    inf.add_argument("--preconditioner", choices=("identity", "diag_fisher"), default="identity",
                     help="adam needs the training optimizer, which a saved model does not have")
    inf.add_argument("--prior", default="natural", help="natural, uniform or a JSON mapping (the Pareto reference)")
    inf.add_argument("--alpha", type=float, default=1.0)
    inf.add_argument("--beta", type=float, default=1.0)
    inf.add_argument("--gamma", type=float, default=1.0)
    inf.add_argument("--no-pareto", "--no_pareto", dest="no_pareto", action="store_true",
                     help="drop the constraint S w >= S prior")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--output", default="influence.json", help="the JSON written (default: influence.json)")
    inf.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    inf.set_defaults(func=cmd_influence)

    sched = sub.add_parser("schedule", help="the mixture schedule of a run, as a file to edit and replay")
    export = sched.add_subparsers(dest="action", required=True).add_parser(
        "export", help="history.json -> schedule.yaml (replay it with --tikmix_solver replay --tikmix_schedule)")
    export.add_argument("history", metavar="HISTORY", help="<output_dir>/tikmix/history.json or its output_dir")
    export.add_argument("-o", "--output", default=None, help="*.yaml or *.json (default: schedule.yaml beside it)")
    export.add_argument("--total-steps", "--total_steps", dest="total_steps", type=int, default=None,
                        help="the run's max_steps, for histories that do not record it")
    export.set_defaults(func=cmd_schedule_export)
    return parser


def cmd_schedule_export(args: argparse.Namespace) -> int:
    from .schedule import export_schedule

    try:
        print(export_schedule(args.history, args.output, total_steps=args.total_steps))
    except (ValueError, ImportError, OSError) as err:
        raise UsageError(str(err)) from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tikmix``; returns the exit status (0, or 2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "train":
            return cmd_train(argv[1:])
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return USAGE_EXIT
        return args.func(args)
    except UsageError as err:
        print(f"tikmix {command}: error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else USAGE_EXIT)
    except KeyboardInterrupt:
        print("tikmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
