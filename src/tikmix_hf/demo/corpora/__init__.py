"""Offline demo corpora, held-out splits and a downstream-style task for TiKMiX.

Everything here works with no network and no Hugging Face hub, one concept a file:

- ``local.py``: :func:`local_corpus`, real multi-domain text found on this machine, and
  :func:`describe_corpus`.
- ``synthetic.py``: :func:`synthetic_corpus`, generated "languages" whose domains have KNOWN
  roles with respect to the validation tasks.
- ``holdout.py``: :func:`holdout_split`, the held-out text of every domain.
- ``choice.py``: the continuation-choice task (:func:`continuation_choice_items`,
  :func:`choice_predictions`, :func:`choice_accuracy`) and :func:`load_metric`, its accuracy as
  an ``evaluate`` module shipped in ``tikmix_hf/demo/metrics/``.

Tokenizers, packing and the tiny Llama the demo trains are :mod:`tikmix_hf.testing`'s
(:func:`~tikmix_hf.testing.train_tokenizer`, :func:`~tikmix_hf.testing.pack_blocks`,
:func:`~tikmix_hf.testing.tiny_llama`), shared with the command line, the tests and the notebooks.
Heavy libraries (torch, transformers, evaluate) are imported inside the functions that need them,
so reading a corpus does not pay for them.
"""

from .choice import choice_accuracy, choice_predictions, continuation_choice_items, load_metric
from .holdout import holdout_split
from .local import describe_corpus, local_corpus
from .synthetic import SyntheticCorpus, synthetic_corpus

__all__ = [
    "SyntheticCorpus",
    "choice_accuracy",
    "choice_predictions",
    "continuation_choice_items",
    "describe_corpus",
    "holdout_split",
    "load_metric",
    "local_corpus",
    "synthetic_corpus",
]
