"""DomainMixture: the stream is a pure function of (seed, index, weight swaps), on every copy."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from helpers.launch import load_script, torchrun
from scipy import stats

from tikmix_hf import DomainMixture

HERE = os.path.dirname(__file__)


def make_sources(sizes=(40, 25, 10)):
    return {
        name: [{"domain": name, "idx": i, "input_ids": [d] * (1 + i % 3)} for i in range(n)]
        for d, (name, n) in enumerate(zip("abc", sizes))
    }


def ids(examples):
    return [(e["domain"], int(e["idx"])) for e in examples]


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def collate(batch):
    return [(e["domain"], int(e["idx"])) for e in batch]


def reference(mixture, start, stop):
    """Brute force: replay the whole stream from 0 in this process and slice it."""
    fresh = DomainMixture(make_sources(), weights="uniform", seed=mixture.seed)
    fresh.load_state_dict({**mixture.state_dict(position=0)})
    return ids(take(fresh, stop))[start:]


# ---------------------------------------------------------------------------- sampling
def test_draw_frequencies_match_weights():
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    mixture = DomainMixture(make_sources(), weights=weights, seed=1)
    n = 20000
    counts = mixture.counts(n)
    observed = np.array([counts[d] for d in "abc"])
    expected = n * np.array([weights[d] for d in "abc"])
    chi2 = stats.chisquare(observed, expected)
    assert chi2.pvalue > 1e-3, (observed, expected)
    # counts() is what iteration produces
    drawn = ids(take(mixture, 2000))
    assert {d: sum(1 for x, _ in drawn if x == d) for d in "abc"} == mixture.counts(2000)


def test_natural_and_uniform_weights():
    src = make_sources()
    natural = DomainMixture(src, weights="natural").weights
    tokens = {d: sum(len(e["input_ids"]) for e in ex) for d, ex in src.items()}
    total = sum(tokens.values())
    assert natural == pytest.approx({d: t / total for d, t in tokens.items()}, abs=1e-15)
    plain = {d: [{"idx": i} for i in range(len(ex))] for d, ex in src.items()}
    by_examples = DomainMixture(plain, weights="natural").weights
    assert by_examples == pytest.approx({"a": 40 / 75, "b": 25 / 75, "c": 10 / 75}, abs=1e-15)
    assert DomainMixture(src, weights="uniform").weights == pytest.approx({d: 1 / 3 for d in "abc"})


def test_zero_weight_domain_is_never_drawn():
    mixture = DomainMixture(make_sources(), weights={"a": 0.0, "b": 1.0, "c": 0.0}, seed=2)
    assert {d for d, _ in ids(take(mixture, 500))} == {"b"}


def test_each_pass_visits_every_example_once_with_a_new_order():
    mixture = DomainMixture(make_sources(), weights={"a": 0.0, "b": 0.0, "c": 1.0}, seed=4)
    drawn = [i for _, i in ids(take(mixture, 30))]
    passes = [drawn[0:10], drawn[10:20], drawn[20:30]]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1]


def test_stop_policy_ends_stream_at_first_exhausted_domain():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=5, exhausted="stop")
    drawn = ids(list(mixture))
    per = {d: sum(1 for x, _ in drawn if x == d) for d in "abc"}
    assert per["c"] == 10  # c (10 examples) ran out first
    assert len(drawn) < 75 and all(per[d] <= n for d, n in zip("abc", (40, 25, 10)))
    # the next sample would have needed an 11th example of c
    nxt = mixture.example_ids(len(drawn), len(drawn) + 1)[0][0]
    assert nxt == "c"


def test_drawn_counts_examples_and_tokens_exactly():
    mixture = DomainMixture(make_sources(), weights={"a": 0.5, "b": 0.3, "c": 0.2}, seed=6)
    n = 333
    examples = take(mixture, n)
    drawn = mixture.drawn(n)
    for d in "abc":
        mine = [e for e in examples if e["domain"] == d]
        assert drawn[d]["examples"] == len(mine)
        assert drawn[d]["tokens"] == sum(len(e["input_ids"]) for e in mine)


# ---------------------------------------------------------------------------- swaps
def test_set_weights_applies_exactly_at_returned_index_in_process():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=7)
    it = iter(mixture)
    before = [next(it) for _ in range(123)]
    at = mixture.set_weights({"a": 0.0, "b": 0.0, "c": 1.0})
    assert at == 123
    after = [next(it) for _ in range(50)]
    assert {e["domain"] for e in after} == {"c"}
    assert ids(before + after) == reference(mixture, 0, 173)
    assert mixture.weights_at(122) == pytest.approx({d: 1 / 3 for d in "abc"})
    assert mixture.weights_at(123)["c"] == 1.0


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True)])
def test_swap_takes_effect_exactly_at_index_with_dataloader_workers(workers, persistent):
    batch = 5
    mixture = DomainMixture(make_sources(), weights="uniform", seed=8)
    mixture.bind_loader(batch, num_workers=workers, prefetch_factor=2 if workers else None)
    loader = torch.utils.data.DataLoader(
        mixture, batch_size=batch, num_workers=workers, collate_fn=collate, persistent_workers=persistent
    )
    it = iter(loader)
    got = [x for _ in range(6) for x in next(it)]
    consumed = len(got)
    at = mixture.set_weights({"a": 0.0, "b": 0.0, "c": 1.0}, at=consumed + mixture.lag_samples())
    got += [x for _ in range(20) for x in next(it)]
    assert {d for d, _ in got[at:]} == {"c"}
    assert len({d for d, _ in got[:at]}) == 3  # the old weights up to the index, not one sample less
    assert got == reference(mixture, 0, len(got))
    # earliest-safe mode: no index given, the change applies to the next undrawn sample
    at2 = mixture.set_weights({"a": 1.0, "b": 0.0, "c": 0.0})
    assert at2 >= len(got)
    rest = [x for _ in range(12) for x in next(it)]
    allgot = got + rest
    assert {d for d, _ in allgot[at2:]} == {"a"}
    assert allgot == reference(mixture, 0, len(allgot))


def test_set_weights_refuses_index_already_drawn():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=9)
    take(mixture, 50)
    with pytest.raises(ValueError, match="already drawn"):
        mixture.set_weights({"a": 1, "b": 1, "c": 1}, at=10)


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kind", ["list", "dataset", "iterable_dataset", "generator_iterable"])
def test_resume_equals_uninterrupted(kind):
    def build():
        src = make_sources()
        if kind == "dataset":
            src = {d: datasets.Dataset.from_list(ex) for d, ex in src.items()}
        elif kind == "iterable_dataset":
            src = {d: datasets.Dataset.from_list(ex).to_iterable_dataset(num_shards=2) for d, ex in src.items()}
        elif kind == "generator_iterable":
            src = {d: ReIterable(ex) for d, ex in src.items()}
        return DomainMixture(src, weights="uniform", seed=10, shuffle_buffer=7)

    full = build()
    full.set_weights({"a": 0.7, "b": 0.2, "c": 0.1}, at=60)
    uninterrupted = ids(take(full, 200))

    first = build()
    first.set_weights({"a": 0.7, "b": 0.2, "c": 0.1}, at=60)
    head = ids(take(first, 90))
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip
    resumed = build()
    resumed.load_state_dict(state)
    tail = ids(take(resumed, 110))
    assert head + tail == uninterrupted
    assert resumed.swaps == full.swaps


def test_seek_jumps_without_replaying():
    mixture = DomainMixture(make_sources(), weights={"a": 0.2, "b": 0.3, "c": 0.5}, seed=12)
    whole = ids(take(mixture, 400))
    mixture.seek(321)
    assert ids(take(mixture, 79)) == whole[321:]


def test_epochs_with_num_samples():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=13, num_samples=30)
    assert len(mixture) == 30
    epoch0 = ids(list(mixture))
    mixture.set_epoch(1)
    epoch1 = ids(list(mixture))
    assert len(epoch0) == len(epoch1) == 30
    endless = DomainMixture(make_sources(), weights="uniform", seed=13)
    assert epoch0 + epoch1 == ids(take(endless, 60))
    with pytest.raises(TypeError, match="max_steps"):
        len(endless)


# ---------------------------------------------------------------------------- sources
class ReIterable:
    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return iter(list(self.examples))


def test_every_source_type(tmp_path):
    base = make_sources()
    files = {}
    for d, ex in base.items():
        path = tmp_path / f"{d}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in ex))
        files[d] = str(path)
    streaming_json = {
        d: datasets.load_dataset("json", data_files=f, split="train", streaming=True) for d, f in files.items()
    }
    text_file = tmp_path / "t.txt"
    text_file.write_text("".join(f"line {i}\n" for i in range(20)))
    kinds = {
        "list": base,
        "dataset": {d: datasets.Dataset.from_list(ex) for d, ex in base.items()},
        "iterable_dataset": {d: datasets.IterableDataset.from_generator(_gen, gen_kwargs={"ex": ex}) for d,
                             ex in base.items()},
        "streaming_json": streaming_json,
        "reiterable": {d: ReIterable(ex) for d, ex in base.items()},
        "torch_map": {d: TorchMap(ex) for d, ex in base.items()},
    }
    for kind, src in kinds.items():
        mixture = DomainMixture(src, weights="uniform", seed=14, shuffle=False)
        got = take(mixture, 60)
        assert all(set(e) >= {"domain", "idx"} for e in got), kind
        by_domain = {d: [int(e["idx"]) for e in got if e["domain"] == d] for d in "abc"}
        for d, xs in by_domain.items():  # unshuffled: each domain is read in source order, cycling
            n = len(base[d])
            assert xs == [i % n for i in range(len(xs))], (kind, d)
    text = DomainMixture(
        {"t": datasets.load_dataset("text", data_files=str(text_file), split="train", streaming=True), "a": base["a"]},
        weights="uniform",
    )
    assert any("text" in e for e in take(text, 20))


def _gen(ex):
    yield from ex


class TorchMap(torch.utils.data.Dataset):
    def __init__(self, ex):
        self.ex = ex

    def __len__(self):
        return len(self.ex)

    def __getitem__(self, i):
        return self.ex[i]


def test_probe_stream_is_separate_from_training():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=15)
    before = ids(take(mixture, 100))
    probes = mixture.probe("a", 50, round=0)
    assert len(probes) == 50 and {e["domain"] for e in probes} == {"a"}
    assert sorted(int(e["idx"]) for e in probes[:40]) == list(range(40))  # a full pass first
    assert ids(mixture.probe("a", 50, round=0)) == ids(probes)
    assert ids(mixture.probe("a", 50, round=1)) != ids(probes)
    assert ids(take(mixture, 100)) == before
    iterable = DomainMixture({d: ReIterable(ex) for d, ex in make_sources().items()}, weights="uniform")
    assert {e["domain"] for e in iterable.probe("b", 30)} == {"b"}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sources": {"a": [], "b": [{"x": 1}]}}, "domain 'a' is empty"),
        ({"sources": {}}, "non-empty mapping"),
        ({"weights": {"a": 1, "b": 1, "c": 1, "zz": 1}}, r"unknown domains \['zz'\]"),
        ({"weights": {"a": 1, "b": 1}}, r"missing \['c'\]"),
        ({"weights": {"a": -1, "b": 1, "c": 1}}, r"weights\['a'\] = -1.0 is negative"),
        ({"weights": {"a": float("nan"), "b": 1, "c": 1}}, "not finite"),
        ({"weights": {"a": 0, "b": 0, "c": 0}}, "all zero"),
        ({"weights": "sqrt"}, "use 'natural', 'uniform'"),
        ({"exhausted": "wrap"}, "exhausted='wrap'"),
        ({"seed": -1}, "seed must be"),
        ({"num_samples": 0}, "num_samples must be"),
    ],
)
def test_bad_input_fails_clearly(kwargs, match):
    kwargs = {"sources": make_sources(), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        DomainMixture(**kwargs)


def test_bad_sources_fail_clearly():
    with pytest.raises(TypeError, match="one-shot iterator"):
        DomainMixture({"a": iter([{"x": 1}]), "b": [{"x": 2}]}, weights="uniform")
    empty = DomainMixture({"a": ReIterable([]), "b": [{"x": 2}]}, weights="uniform")
    with pytest.raises(ValueError, match="domain 'a' yielded no examples"):
        take(empty, 10)
    with pytest.raises(ValueError, match="needs the size of every domain"):
        DomainMixture({"a": ReIterable([{"x": 1}]), "b": [{"x": 2}]})
    mixture = DomainMixture(make_sources(), weights="uniform")
    with pytest.raises(ValueError, match="unknown domain 'zz'"):
        mixture.probe("zz", 3)


def test_state_from_other_domains_or_tampered_is_refused_and_changes_nothing():
    mixture = DomainMixture(make_sources(), weights="uniform", seed=16)
    take(mixture, 40)
    state = mixture.state_dict()
    other = DomainMixture({"a": make_sources()["a"], "x": make_sources()["b"]}, weights="uniform", seed=16)
    with pytest.raises(ValueError, match=r"missing now: \['b', 'c'\], new: \['x'\]"):
        other.load_state_dict(state)
    target = DomainMixture(make_sources(), weights={"a": 1, "b": 0, "c": 0}, seed=16)
    swaps_before = target.swaps
    bad_cursors = {**state, "cursors": [0, 0, 0]}
    with pytest.raises(ValueError, match="cursors"):
        target.load_state_dict(bad_cursors)
    assert target.swaps == swaps_before
    with pytest.raises(ValueError, match="seed=16"):
        DomainMixture(make_sources(), weights="uniform", seed=17).load_state_dict(state)
    with pytest.raises(ValueError, match="simplex"):
        target.load_state_dict({**state, "schedule": [[0, [0.5, 0.5, 0.5]]]})
    with pytest.raises(ValueError, match="not a DomainMixture state"):
        target.load_state_dict({"format": "pickle"})


# ---------------------------------------------------------------------------- two ranks
@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_see_one_stream_with_dispatch_on_and_off(tmp_path):
    torchrun("dist_mixture.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    dist_mixture = load_script("dist_mixture")
    BATCH, sources = dist_mixture.BATCH, dist_mixture.sources

    for mode in ranks[0]:
        r0, r1 = ranks[0][mode], ranks[1][mode]
        assert r0["world"] == r1["world"] == 2
        assert r0["at"] == r1["at"] and r0["swaps"] == r1["swaps"]
        # rank r holds samples [s*2B + r*B, s*2B + (r+1)*B) of the one global stream
        stream = []
        for b0, b1 in zip(r0["batches"], r1["batches"]):
            stream += list(zip(*b0)) + list(zip(*b1))
        ref = DomainMixture(sources(), weights="uniform", seed=11)
        ref.set_weights({"a": 0.0, "b": 0.2, "c": 0.8}, at=r0["at"])
        names = {"a": 0, "b": 1, "c": 2}
        expected = [(names[d], i) for d, i in ref.example_ids(0, len(stream))]
        assert [tuple(x) for x in stream] == expected, mode
        assert all(d != 0 for d, _ in stream[r0["at"]:])
        assert len(stream) == 15 * 2 * BATCH


def test_cached_draw_counts_follow_a_weight_swap_behind_them():
    from tikmix_hf.mixture.choices import DomainChoices, reader_of
    from tikmix_hf.mixture.swaps import WeightSwaps

    swaps = WeightSwaps(["a", "b", "c"], max_stages=4)
    swaps.publish(0, np.array([0.2, 0.3, 0.5]))
    choices = DomainChoices(7, swaps)
    layout = (2, 2, 8)  # 2 workers x 2 ranks, chunks of 8
    choices.counts(5000)
    choices.reader_counts(5000, layout)  # both caches now reach sample 5000
    swaps.publish(1000, np.array([0.7, 0.2, 0.1]))
    choices.forget_from(1000)

    ids = DomainChoices(7, swaps).domain_ids(0, 5000)  # a fresh copy: nothing cached
    assert choices.counts(5000).tolist() == np.bincount(ids, minlength=3).tolist()
    readers = reader_of(np.arange(5000), layout)
    brute = np.zeros((4, 3), dtype=np.int64)
    np.add.at(brute, (readers, ids), 1)
    assert choices.reader_counts(5000, layout).tolist() == brute.tolist()
