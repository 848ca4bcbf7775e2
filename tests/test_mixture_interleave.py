"""``tikmix_hf.interleave_datasets``: the ``datasets`` function's arguments, a DomainMixture back."""

from itertools import islice

import datasets
import numpy as np
import pytest
from scipy import stats

from tikmix_hf import DomainMixture, interleave_datasets

pytestmark = pytest.mark.filterwarnings("ignore:interleave_datasets. the datasets carry no distinct names")


def parts(sizes=(30, 20, 10)):
    return [datasets.Dataset.from_dict({"d": [i] * n, "i": list(range(n))}) for i, n in enumerate(sizes)]


def test_same_inputs_as_datasets_give_a_mixture_with_those_probabilities():
    probabilities = [0.5, 0.3, 0.2]
    theirs = datasets.interleave_datasets(parts(), probabilities=probabilities, seed=3,
                                          stopping_strategy="all_exhausted")
    with pytest.warns(UserWarning, match=r"no distinct names of their own .* pass names="):
        ours = interleave_datasets(parts(), probabilities=probabilities, seed=3, stopping_strategy="all_exhausted")
    assert isinstance(ours, DomainMixture) and ours.domains == ["domain_0", "domain_1", "domain_2"]
    n = 6000
    observed = np.bincount([e["d"] for e in islice(ours, n)], minlength=3)
    assert stats.chisquare(observed, n * np.array(probabilities)).pvalue > 1e-3
    assert set(theirs.column_names) == set(next(iter(ours)))  # the same examples come out


def test_stopping_strategies_behave_as_documented():
    first = interleave_datasets(parts(), probabilities=[0.2, 0.2, 0.6], seed=1)  # first_exhausted
    drawn = [(e["d"], e["i"]) for e in first]
    per = np.bincount([d for d, _ in drawn], minlength=3)
    assert per[2] == 10 and all(per[:2] < [30, 20])  # ends when the 10-row dataset would need a new pass
    assert first.exhausted == "stop"
    cycling = interleave_datasets(parts(), seed=1, stopping_strategy="all_exhausted")
    many = [(e["d"], e["i"]) for e in islice(cycling, 300)]
    assert cycling.exhausted == "cycle" and len(many) == 300  # every dataset cycles: the stream goes on
    assert {i for d, i in many if d == 2} == set(range(10))


def test_names_come_from_argument_or_dataset_info():
    named = interleave_datasets(parts(), names=["web", "code", "law"])
    assert named.domains == ["web", "code", "law"]
    infos = parts()
    for k, ds in enumerate(infos):
        ds.info.dataset_name = f"corpus{k}"
    infos[1].info.config_name = "en"
    assert interleave_datasets(infos).domains == ["corpus0", "corpus1/en", "corpus2"]
    assert interleave_datasets(dict(zip(["web", "code", "law"], parts()))).domains == ["web", "code", "law"]


def test_local_files_are_named_by_their_splits_not_their_builder(tmp_path):
    """``load_dataset("json", ...)`` names every dataset "json"; the split names of ``data_files`` are kept."""
    for name in ("code", "web"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    files = {name: str(tmp_path / f"{name}.jsonl") for name in ("code", "web")}
    loaded = datasets.load_dataset("json", data_files=files)
    assert interleave_datasets([loaded["code"], loaded["web"]]).domains == ["code", "web"]
    streamed = datasets.load_dataset("json", data_files=files, streaming=True)
    assert interleave_datasets([streamed["code"], streamed["web"]]).domains == ["code", "web"]
    assert interleave_datasets(loaded).domains == ["code", "web"]  # a DatasetDict: its keys
    plain = [datasets.load_dataset("json", data_files=path, split="train") for path in files.values()]
    with pytest.warns(UserWarning, match="domain_0, domain_1 in history.json"):
        assert interleave_datasets(plain).domains == ["domain_0", "domain_1"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"probabilities": [0.5, 0.5]}, r"probabilities has 2 entries for 3 datasets"),
        ({"probabilities": [0.5, -0.1, 0.6]}, r"probabilities\[1\] = -0.1 must be a finite number >= 0"),
        ({"probabilities": [0, 0, 0]}, r"probabilities are all zero"),
        ({"stopping_strategy": "longest"}, r"stopping_strategy='longest' is not one of"),
        ({"names": ["a", "a", "b"]}, r"must give 3 distinct names"),
        ({"seed": -2}, r"seed=-2 must be a non-negative int"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interleave_datasets(parts(), **kwargs)
    with pytest.raises(ValueError, match="non-empty list of datasets"):
        interleave_datasets([])
