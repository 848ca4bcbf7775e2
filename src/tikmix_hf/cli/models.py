"""The model and tokenizer a command starts from: a saved folder, a config file or a preset."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import FileReadError, read_structured
from .errors import UsageError

MODEL_PRESETS: dict[str, dict[str, Any]] = {  # tiny_llama's keyword arguments
    "tiny": dict(hidden_size=64, layers=2, heads=4),
    "small": dict(hidden_size=128, layers=4, heads=4),
}


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
        metadata={"help": "A local tokenizer folder. Default: the model's, or a byte-level BPE trained on the "
                          "domains."},
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the tokenizer trained on the domains."})


def model_config_spec(value: str | None) -> dict | str | None:
    if value is None or value in MODEL_PRESETS:
        return value
    path = Path(value)
    if not path.is_file():
        raise UsageError(
            f"--model_config {value}: neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing config JSON file"
        )
    try:
        spec = read_structured(path, f"--model_config {value}")
    except (FileReadError, ImportError) as err:
        raise UsageError(f"{err}; give a config JSON file (a JSON object of config fields)") from None
    if not isinstance(spec, dict):
        raise UsageError(
            f"--model_config {value}: expected a JSON object of config fields, got {type(spec).__name__}"
        )
    return spec


def build_tokenizer(model_args: ModelArguments, training_args, texts: Mapping[str, list[str]]):
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source:
        tokenizer = load_tokenizer(source, "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path
                                    else "--model_name_or_path")
    else:
        from ..testing import train_tokenizer

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


def load_tokenizer(source: str, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(
            f"{flag} {source}: no tokenizer could be loaded from it ({str(err).splitlines()[0][:200]}); give a folder "
            "written by tokenizer.save_pretrained (e.g. --tokenizer_name_or_path PATH)"
        ) from None


def build_model(model_args: ModelArguments, spec, tokenizer, block_size: int, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..testing import tiny_llama

    if model_args.model_name_or_path:
        return load_model(model_args.model_name_or_path, "--model_name_or_path")
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


def load_model(path: str, flag: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(
            f"{flag} {path}: no causal language model could be loaded from it ({str(err).splitlines()[0][:200]}); "
            "give a folder written by model.save_pretrained (config.json and the weights)"
        ) from None
