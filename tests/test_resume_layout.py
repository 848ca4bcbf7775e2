"""Resume under another layout: another number of DataLoader workers, another per-device batch at the same
global batch, another number of ranks (1 <-> 2), for map-style and streamed domains, measuring with probes or
in the training window. Each continues exactly (the same samples from the same index, the same decision to
rounding) or is refused before the first step, naming both layouts and the fix (docs/reliability.md). And a
two-rank resume inside a window where one rank lacks its window file: every rank measures with probes."""

import json
import warnings

import numpy as np
import pytest
from helpers.launch import load_script, torchrun

from tikmix_hf.influence.window_lifecycle import WINDOW_FILE

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]
RUN = load_script("layout_run")
CASES = [(kind, source) for kind in ("map", "stream") for source in ("probes", "training")]
# (per-device batch, accumulation, workers) of each layout; every one reads 8 samples per optimizer step
ONE_RANK, WORKERS, SMALLER_BATCH, TWO_RANKS = (8, 1, 0), (8, 1, 2), (4, 2, 0), (4, 1, 0)
#: What each change does: "exact", or "refused" (streamed domains are read by shard, per reader layout).
EXPECTED = {
    "2 DataLoader workers": {"map": "exact", "stream": "refused"},
    "per-device batch 4 x 2 accumulation": {"map": "exact", "stream": "exact"},
    "1 -> 2 ranks": {"map": "exact", "stream": "exact"},
    "2 -> 1 rank": {"map": "exact", "stream": "exact"},
}


def spec(out, kind, source, layout, resume=None):
    return ",".join(map(str, (out, kind, source, *layout, *([resume] if resume else []))))


def outcome(out, ranks=1):
    """``("exact", global stream, first stage)`` or ``("refused", error text)`` of a run in ``out``."""
    errors = [out / f"error-rank{r}.txt" for r in range(ranks)]
    if any(e.exists() for e in errors):
        return "refused", " ".join(e.read_text() for e in errors if e.exists()), None
    runs = [json.loads((out / f"seen-rank{r}.json").read_text()) for r in range(ranks)]
    rows = TWO_RANKS[0]  # micro-step k trains rank 0's rows, then rank 1's, of the stream's k-th micro-batch
    steps = len(runs[0]["seen"]) // rows
    stream = [sid for k in range(steps) for r in runs for sid in r["seen"][k * rows:(k + 1) * rows]]
    return "exact", stream, runs[0]["history"][0]


def same_continuation(base, resumed, source):
    _, base_stream, base_stage = base
    _, stream, stage = resumed
    position = RUN.SAVE * RUN.GLOBAL_BATCH
    assert stream == base_stream[position:RUN.STEPS * RUN.GLOBAL_BATCH]  # the same samples from the same index
    assert stage["step"] == base_stage["step"] == RUN.STAGE
    for d, w in base_stage["weights_after"].items():
        assert stage["weights_after"][d] == pytest.approx(w, abs=1e-6)
    np.testing.assert_allclose(stage["influence"]["scores"], base_stage["influence"]["scores"], rtol=1e-4)
    window = stage["influence"]["window"]
    assert (window is not None) == (source == "training")
    if window is not None:  # the window read the same sequences across the resume, and nothing fell back
        assert window["sequences"] == base_stage["influence"]["window"]["sequences"]
        assert not stage["warnings"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this module: one-rank runs here, two-rank runs in one torchrun launch, then the resumes."""
    tmp_path = tmp_path_factory.mktemp("layouts")

    def checkpoint(name, kind, source):
        return str(tmp_path / f"{name}-{kind}-{source}" / f"checkpoint-{RUN.SAVE}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, source in CASES:  # the one-rank runs that the others resume
            RUN.job(str(tmp_path / f"one-{kind}-{source}"), kind, source, *ONE_RANK)
        jobs = []
        for kind, source in CASES:  # on two ranks: their own runs, and the one-rank checkpoints resumed
            jobs.append(spec(tmp_path / f"two-{kind}-{source}", kind, source, TWO_RANKS))
            jobs.append(spec(tmp_path / f"up-{kind}-{source}", kind, source, TWO_RANKS,
                             checkpoint("one", kind, source)))
        jobs.append(spec(tmp_path / "lacking", "map", "training", TWO_RANKS,  # rank 1's window file left behind
                         checkpoint("two", "map", "training") + "!" + WINDOW_FILE.format(rank=1)))
        torchrun("layout_run.py", *jobs)
        for kind, source in CASES:
            for name, layout, base in (("workers", WORKERS, "one"), ("batch", SMALLER_BATCH, "one"),
                                       ("down", ONE_RANK, "two")):
                RUN.job(str(tmp_path / f"{name}-{kind}-{source}"), kind, source, *layout,
                        checkpoint(base, kind, source))
    return tmp_path


def test_resume_under_another_layout_continues_exactly_or_is_refused(runs):
    tmp_path = runs
    table = {}
    for kind, source in CASES:
        one, two = outcome(tmp_path / f"one-{kind}-{source}"), outcome(tmp_path / f"two-{kind}-{source}", 2)
        if kind == "stream":  # streamed examples are not counted in tokens: the stage says so instead of nothing
            assert one[2]["tokens_seen"] is None and one[2]["notes"][0].startswith("tokens_seen not recorded: the "
                                                                                   "training tokens cannot be counted")
        for change, name, base, ranks in (("2 DataLoader workers", "workers", one, 1),
                                          ("per-device batch 4 x 2 accumulation", "batch", one, 1),
                                          ("1 -> 2 ranks", "up", one, 2), ("2 -> 1 rank", "down", two, 1)):
            got = outcome(tmp_path / f"{name}-{kind}-{source}", ranks)
            table[change, kind, source] = got[0]
            if got[0] == "exact":
                same_continuation(base, got, source)
            else:  # refused when training starts, naming both reader layouts and the fix
                assert "saved with a reader layout of (1, 1, 0)" in got[1] and "now runs with (2, 1, 8)" in got[1]
                assert "Resume with the saved DataLoader workers (dataloader_num_workers)" in got[1]
                assert not (tmp_path / f"{name}-{kind}-{source}" / "checkpoint-9").exists()  # no step was taken
    assert table == {(change, kind, source): EXPECTED[change][kind] for change in EXPECTED for kind, source in CASES}


def test_a_resume_where_one_rank_lacks_its_window_file_measures_with_probes_on_every_rank(runs):
    """The ranks agree on the files before any other collective: no rank hangs in a window's all-reduce that the
    other never joins, and the stage says why it was measured with probes."""
    kind, stream, stage = outcome(runs / "lacking", 2)  # both ranks finished
    assert stage["influence"]["window"] is None and stage["status"] in ("converged", "restarted")
    (note,) = [w for w in stage["warnings"] if "measured with probes" in w]
    assert WINDOW_FILE.format(rank=1) in note and "on 1 of 2 ranks" in note
    _, base_stream, _ = outcome(runs / "two-map-training", 2)
    assert stream == base_stream[RUN.SAVE * RUN.GLOBAL_BATCH:RUN.STEPS * RUN.GLOBAL_BATCH]
