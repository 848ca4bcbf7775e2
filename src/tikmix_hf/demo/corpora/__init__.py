"""Offline demo corpora, tokenizers, tiny models and a downstream-style task for TiKMiX.

Everything here works with no network and no Hugging Face hub, one concept a file:

- ``local.py``: :func:`local_corpus`, real multi-domain text found on this machine, and
  :func:`describe_corpus`.
- ``synthetic.py``: :func:`synthetic_corpus`, generated "languages" whose domains have KNOWN
  roles with respect to the validation tasks.
- ``packing.py``: :func:`train_tokenizer`, :func:`byte_tokenizer`, :func:`pack_blocks` and
  :func:`holdout_split`.
- ``model.py``: :func:`tiny_llama`.
- ``choice.py``: the continuation-choice task (:func:`continuation_choice_items`,
  :func:`choice_predictions`, :func:`choice_accuracy`) and :func:`load_metric`, its accuracy as
  an ``evaluate`` module shipped in ``tikmix_hf/demo/metrics/``.

Heavy libraries (torch, transformers, datasets, tokenizers, evaluate) are imported inside the
functions that need them, so reading a corpus does not pay for them.
"""

from .choice import choice_accuracy, choice_predictions, continuation_choice_items, load_metric
from .local import describe_corpus, local_corpus
from .model import tiny_llama
from .packing import byte_tokenizer, holdout_split, pack_blocks, train_tokenizer
from .synthetic import SyntheticCorpus, synthetic_corpus

__all__ = [
    "SyntheticCorpus",
    "byte_tokenizer",
    "choice_accuracy",
    "choice_predictions",
    "continuation_choice_items",
    "describe_corpus",
    "holdout_split",
    "load_metric",
    "local_corpus",
    "pack_blocks",
    "synthetic_corpus",
    "tiny_llama",
    "train_tokenizer",
]
