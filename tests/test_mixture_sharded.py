"""Streamed domains read by shard: each (rank, worker) reader reads only its own files, resumes from
saved (shard, block) cursors without reading what lies before them, and probes from across the shards."""

import json
from itertools import islice

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from tikmix_hf import DomainMixture

ROWS = 40  # rows per file


def write_files(folder, files, rows=ROWS):
    paths = []
    for s in range(files):
        path = folder / f"part{s:03d}.jsonl"
        path.write_text("".join(json.dumps({"s": s, "o": o}) + "\n" for o in range(rows)))
        paths.append(str(path))
    return paths


def counted(paths, counter):
    """A streaming JSON domain whose every delivered row is counted per DataLoader worker."""

    def count(row):
        info = get_worker_info()
        counter[0 if info is None else info.id] += 1
        return row

    ds = datasets.load_dataset("json", data_files=paths, split="train", streaming=True)
    return ds.map(count)


def small():
    return [{"s": -1, "o": i} for i in range(30)]


def collate(batch):
    return [(int(e["s"]), int(e["o"])) for e in batch]


def read(mixture, workers, batches, batch=4):
    mixture.bind_loader(batch, num_workers=workers)
    loader = DataLoader(mixture, batch_size=batch, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    return [x for _ in range(batches) for x in next(it)]


@pytest.fixture
def files32(tmp_path):
    return write_files(tmp_path, 32)


def test_four_workers_each_read_a_quarter_of_the_rows_of_their_own_files(files32):
    counter = torch.zeros(8, dtype=torch.int64).share_memory_()
    mixture = DomainMixture({"web": counted(files32, counter), "small": small()},
                            weights={"web": 0.9, "small": 0.1}, seed=3, shuffle_buffer=8)
    got = read(mixture, 4, 120)
    web = [x for x in got if x[0] >= 0]
    assert len(set(web)) == len(web)  # 480 samples from a 1280-row domain: no row twice
    # which worker read which row: the samples of worker w's batches
    per_worker = [[x for b in range(w, 120, 4) for x in got[4 * b: 4 * b + 4] if x[0] >= 0] for w in range(4)]
    for rows in per_worker:
        assert len({s % 4 for s, _ in rows}) == 1  # one reader's files only
    reads = counter[:4].tolist()
    for w in range(4):  # rows read = rows used, plus at most the block in flight (and one batch of look-ahead)
        assert len(per_worker[w]) <= reads[w] <= len(per_worker[w]) + 8 + 4 * 4, (w, reads, len(per_worker[w]))
    assert sum(reads) <= 1.1 * len(web) + 4 * (8 + 16)


def test_fewer_shards_than_readers_warns_and_stays_exact(tmp_path):
    paths = write_files(tmp_path, 2)

    def make(**kw):
        web = datasets.load_dataset("json", data_files=paths, split="train", streaming=True)
        return DomainMixture({"web": web, "small": small()}, weights="uniform", seed=4, shuffle_buffer=8, **kw)

    with pytest.warns(UserWarning, match=r"domain 'web' has 2 shards for 4 readers.*4x the rows"):
        first = read(make(), 4, 20)
    # read in full by every copy, as a mixture told not to shard reads it in one process
    assert read(make(shard=False), 0, 20) == first


@pytest.mark.parametrize("workers", [0, 2])
def test_each_layout_gives_the_same_stream_every_run_and_swaps_exactly(files32, workers):
    def run():
        web = datasets.load_dataset("json", data_files=files32, split="train", streaming=True)
        mixture = DomainMixture({"web": web, "small": small()}, weights="uniform", seed=5, shuffle_buffer=8)
        mixture.bind_loader(4, num_workers=workers)
        loader = DataLoader(mixture, batch_size=4, num_workers=workers, collate_fn=collate)
        it = iter(loader)
        got = [x for _ in range(10) for x in next(it)]
        at = mixture.set_weights({"web": 0.0, "small": 1.0}, at=len(got) + mixture.lag_samples())
        got += [x for _ in range(20) for x in next(it)]
        return got, at

    (a, at), (b, _) = run(), run()
    assert a == b
    assert all(s == -1 for s, _ in a[at:]) and any(s >= 0 for s, _ in a[:at])


def test_resume_at_90_percent_reads_nothing_before_the_cursor(tmp_path):
    paths = write_files(tmp_path, 8, rows=50)  # 400 rows
    counter = torch.zeros(8, dtype=torch.int64).share_memory_()

    def build():
        return DomainMixture({"web": counted(paths, counter), "small": small()},
                             weights={"web": 0.95, "small": 0.05}, seed=6, shuffle_buffer=10)

    full = build()
    whole = [(int(e["s"]), int(e["o"])) for e in islice(full, 420)]
    first = build()
    head = [(int(e["s"]), int(e["o"])) for e in islice(first, 380)]
    state = json.loads(json.dumps(first.state_dict()))  # 380 samples: about 90% of the domain's rows drawn
    resumed = build()
    resumed.load_state_dict(state)
    counter.zero_()
    tail = [(int(e["s"]), int(e["o"])) for e in islice(resumed, 40)]
    assert head + tail == whole
    web_tail = sum(1 for s, _ in tail if s >= 0)
    # the block in flight (10 rows) is re-read from its start, nothing before it
    assert int(counter[0]) <= web_tail + 2 * 10, (int(counter[0]), web_tail)


def test_resume_under_another_layout_is_refused(files32):
    mixture = DomainMixture({"web": datasets.load_dataset("json", data_files=files32, split="train", streaming=True),
                             "small": small()}, weights="uniform", seed=7, shuffle_buffer=8)
    read(mixture, 2, 5)
    state = mixture.state_dict(position=20)
    assert state["readers"]["layout"] == [2, 1, 4]
    other = DomainMixture({"web": datasets.load_dataset("json", data_files=files32, split="train", streaming=True),
                           "small": small()}, weights="uniform", seed=7, shuffle_buffer=8)
    other.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"saved with a reader layout .* \(2, 1, 4\) .* now runs with \(1, 1, 0\)"):
        next(iter(other))


def test_probes_come_from_across_the_shards_and_change_every_round(files32):
    mixture = DomainMixture({"web": datasets.load_dataset("json", data_files=files32, split="train", streaming=True),
                             "small": small()}, weights="uniform", seed=8)
    rounds = [[(e["s"], e["o"]) for e in mixture.probe("web", 16, round=r)] for r in range(3)]
    for probes in rounds:
        assert len({s for s, _ in probes}) == 16  # 16 probes from 16 different files of 32
    assert len({x for probes in rounds for x in probes}) == 48  # new rows every round
    assert len({s for probes in rounds for s, _ in probes}) == 32  # three rounds visit every file
    assert mixture.probe("web", 16, round=1) == mixture.probe("web", 16, round=1)


def test_probe_holdout_keeps_probe_rows_out_of_training(files32):
    def build():
        return DomainMixture({"web": datasets.load_dataset("json", data_files=files32, split="train", streaming=True),
                              "small": small()}, weights={"web": 1.0, "small": 0.0}, seed=9, probe_holdout=0.2)

    mixture = build()
    trained = {(int(e["s"]), int(e["o"])) for e in islice(mixture, 1500)}  # more than a pass
    probes = {(e["s"], e["o"]) for r in range(4) for e in build().probe("web", 16, round=r)}
    assert len(probes) == 64 and not probes & trained
    assert 0.7 * 1280 < len(trained) < 0.9 * 1280  # about 80% of the rows are training's


def test_bijection_is_a_permutation():
    from tikmix_hf.mixture.bijection import KeyedBijection, derive_key

    for n in (1, 2, 3, 5, 7, 13, 97, 101, 1009, 2, 4, 64, 1024, 4096):
        for key in range(3):
            assert sorted(KeyedBijection(n, derive_key(key, n))(np.arange(n)).tolist()) == list(range(n))
    n = 10**9 + 7  # large: a sample of images is distinct and inside [0, n)
    y = KeyedBijection(n, derive_key(1))(np.arange(0, n, n // 200_000))
    assert len(np.unique(y)) == len(y) and y.min() >= 0 and y.max() < n
    assert abs(np.mean(y) / n - 0.5) < 0.01  # spread over the range, not bunched at the start
    a, b = (KeyedBijection(1000, derive_key(k))(np.arange(1000)) for k in (1, 2))
    assert not np.array_equal(a, b)
