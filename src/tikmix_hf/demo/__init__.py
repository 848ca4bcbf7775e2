"""The main job: TiKMiX against a static mixture on an embedded corpus, at equal training tokens.

:func:`run_demo` builds a corpus with no network (:mod:`tikmix_hf.demo.corpora`), trains a BPE
tokenizer on it, packs fixed-length blocks per domain, and carves held-out text out of a few
target domains. From that text come the validation tasks:

- one held-out-text task per target domain (loss: mean token cross-entropy), and
- one downstream-style task, "which of 4 continuations is the real one" on held-out text of
  another target domain (its TiKMiX loss is the cross-entropy of the true continuation after the
  prefix; it is reported as accuracy, scored by the ``choice_accuracy`` ``evaluate`` module
  shipped in ``tikmix_hf/demo/metrics/``).

The held-out documents of each target are split in two disjoint halves: TiKMiX measures influence
on one (``validation``), the numbers in the report come from the other (``test``), so no arm is
scored on text its mixer looked at.

Then every arm trains a fresh copy of the same initial model (same seed, same data order until a
mixture changes) for the same number of optimizer steps of the same batch of packed blocks, so
every arm trains on exactly the same number of tokens:

- ``static`` (or ``natural``): the natural mixture (token proportions), never changed;
- ``uniform``: equal weights, never changed;
- ``tikmix_d`` / ``tikmix_m``: the natural mixture aligned to the tasks before step 0, then re-decided by
  :class:`~tikmix_hf.TiKMiXCallback` (TiKMiX-D or TiKMiX-M) with the default, scale-aware trust-region
  objective at its default schedule (5, 25, 50 and 75% of training);
- ``tikmix_d_general``: ``tikmix_d`` with the guard for general ability (a validation task drawn from the
  natural mixture, ``tikmix_general_sequences=16``);
- ``tikmix_d_paper`` / ``tikmix_m_paper``: the same with the paper's objective (Eq. 10) at the
  preset's stage fractions.

``tikmix demo`` trains ``static``, ``tikmix_d``, ``tikmix_d_general``, ``tikmix_d_paper`` and ``tikmix_m`` by
default.

The tokens TiKMiX reads to measure influence (probe and validation sequences) are extra forward
and backward passes, not training; they are reported separately, as is the time they take.

Outputs in ``output_dir``: ``results.json`` (every number), ``report.md`` (the tables),
``plots/*.png`` (validation curves per seed, weights over training and the influence heatmap of
every stage per TiKMiX run) and ``runs/seed<s>/<arm>/tikmix/history.json``.

Example::

    from tikmix_hf.demo import run_demo
    results = run_demo(corpus="synthetic", quick=True, output_dir="demo-out")
    print(results["summary"])

One concept a file: ``arms.py`` (the ways of mixing), ``sizes.py`` (the presets), ``data.py``
(corpus to validation and test sets), ``evaluation.py`` (held-out losses, the accuracy metric),
``callbacks.py`` (the Trainer callbacks of one arm), ``engine.py`` (:func:`train_arm`,
:func:`run_demo`), ``results.py`` (the summary and the pictures), ``report.py`` (the tables it prints
and ``report.md``), and ``corpora/``. The tokenizer, the packing and the model come from
:mod:`tikmix_hf.testing`.
"""

from .arms import ARMS, Arm
from .data import LOCAL_CHOICE_TARGETS, LOCAL_TEXT_TARGETS, DemoData, prepare_data
from .engine import run_demo, train_arm
from .evaluation import held_out_losses
from .results import draw_results
from .sizes import SIZES, DemoSize

__all__ = [
    "ARMS",
    "LOCAL_CHOICE_TARGETS",
    "LOCAL_TEXT_TARGETS",
    "SIZES",
    "Arm",
    "DemoData",
    "DemoSize",
    "draw_results",
    "held_out_losses",
    "prepare_data",
    "run_demo",
    "train_arm",
]
