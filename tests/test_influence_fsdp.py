"""Group Influence on sharded models (FSDP2 and FSDP1) against one process, on two CPU ranks with gloo.

One torchrun launch (``dist_influence_fsdp.py``) runs every sharded case; the single-process
reference is computed here with the same data, the same AdamW step and the same code path a
notebook would take.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers.launch import load_script, torchrun

dist_influence_fsdp = load_script("dist_influence_fsdp")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

KINDS = ("fsdp2", "fsdp1")
SCORES = ("identity", "adam", "diag_fisher", "kept_adam", "kept_diag_fisher", "lookahead", "adaptive")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The two ranks' reports and the single-process reference, computed while the ranks run."""
    out = tmp_path_factory.mktemp("fsdp")
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PYTHONPATH"], before = path, os.environ.get("PYTHONPATH")
    try:
        with ThreadPoolExecutor(1) as pool:
            # The ranks spend their first seconds importing; the reference overlaps with that.
            run = pool.submit(torchrun, "dist_influence_fsdp.py", str(out))
            single = dist_influence_fsdp.measure(None)
            run.result()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], single


@pytest.fixture(scope="module")
def ranks(launched):
    return launched[0]


@pytest.fixture(scope="module")
def single(launched):
    return launched[1]


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_scores_match_one_process(ranks, single, kind):
    report = ranks[0][kind]
    assert "error" not in report, report.get("trace")
    assert ranks[1][kind] == report  # every rank returns the same result
    for key in SCORES:
        if kind == "fsdp1" and key == "lookahead":
            assert "does not support FullyShardedDataParallel (FSDP1)" in report[key]
            continue
        expected = np.asarray(single[key])
        np.testing.assert_allclose(np.asarray(report[key]), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max(),
                                   err_msg=f"{kind} {key}")
    for name in ("identity", "adam", "diag_fisher"):
        assert report[f"{name}_used"] == single[f"{name}_used"] == name
    assert report["task_losses"] == pytest.approx(single["task_losses"], rel=1e-10)
    assert report["domain_losses"] == pytest.approx(single["domain_losses"], rel=1e-10)
    assert report["domain_tokens"] == single["domain_tokens"]
    assert report["adaptive_tokens"] == single["adaptive_tokens"] == single["domain_tokens"]
    assert "projection_dim=8 is not supported" in report["projection"]


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_buffers_are_a_shard_of_the_whole(ranks, single, kind):
    # identity, two tasks: n validation rows plus one micro-batch gradient, (n + 1) x P bytes in one
    # process; every dimension of the tiny Llama is even, so a rank's pieces are exactly half.
    n, itemsize = 2, 8
    assert single["buffer_bytes"] == (n + 1) * single["num_parameters"] * itemsize
    # FSDP1's .grad are views that the pass's backward would overwrite, so the gradients left by the
    # training step are copied aside: one more shard.
    copies = 1 if kind == "fsdp1" else 0
    for r in range(2):
        assert ranks[r][kind]["num_parameters"] * 2 == single["num_parameters"]
        assert ranks[r][kind]["buffer_bytes"] == (n + 1 + copies) * single["num_parameters"] * itemsize // 2


@pytest.mark.parametrize("kind", KINDS)
def test_training_continues_bitwise_after_measuring(ranks, kind):
    for r in range(2):
        report = ranks[r][f"{kind}_continuation"]
        assert report == {"unchanged": True, "continues_bitwise": True}


def test_replicated_parameters_beside_fully_shard_are_refused(ranks):
    for r in range(2):
        assert "is not sharded by fully_shard" in ranks[r]["partial"]
        assert "fully_shard(model)" in ranks[r]["partial"]


def test_fsdp1_without_sharding_is_refused(ranks):
    for r in range(2):
        assert "NO_SHARD, which replicates parameters across ranks" in ranks[r]["no_shard"]
