"""Multiple-choice accuracy as a local ``evaluate`` module shipped with tikmix_hf.

Load it with ``tikmix_hf.demo.corpora.load_metric()`` (or ``evaluate.load(<this folder>)``); it
never touches the Hugging Face hub. Keep one import per line: evaluate's import scanner
mis-reads ``import a, b``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy of multiple-choice predictions: the fraction of items whose predicted choice index
equals the reference index. Used for continuation-choice validation tasks, where a causal LM
picks the continuation it finds most likely; chance is 1 / n_choices.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of int): predicted choice index per item.
    references (list of int): true choice index per item.
Returns:
    accuracy (float): mean of predictions == references, in [0, 1].
Example:
    >>> metric = tikmix_hf.demo.corpora.load_metric()
    >>> metric.compute(predictions=[0, 2, 1], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666}
"""


class ChoiceAccuracy(evaluate.Metric):
    """Fraction of items whose predicted choice index equals the reference index."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.size == 0:
            raise ValueError("choice_accuracy needs at least one prediction")
        return {"accuracy": float(np.mean(predictions == references))}
