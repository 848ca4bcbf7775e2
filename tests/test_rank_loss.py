"""A rank dies (SIGKILL) or freezes (SIGSTOP) in a two-rank run: the other rank stops within the bound, says
what it was doing and which rank it lost, leaves no half-written file, and the resumed run equals an
uninterrupted one (docs/reliability.md, "A rank is lost")."""

import json
import os
import signal
import threading
import time

import pytest
from helpers.launch import load_script, two_nodes

from tikmix_hf.history import latest_checkpoint, load_history

pytestmark = pytest.mark.distributed
RUN = load_script("rank_loss_run")
#: How long a surviving rank may take to stop once its peer died: gloo sees the closed connection at once;
#: the rest is the survivor's own exit (tracebacks, interpreter teardown) on a loaded 2-core machine.
DEAD_PEER_BOUND = 60.0


def launch(*jobs):
    """Run ``jobs`` on two one-rank nodes: ``(return codes, each node's stderr, seconds from the loss of a rank to
    the end of the other rank's node)``; the last is ``None`` when no rank is lost."""
    agents = two_nodes("rank_loss_run.py", *jobs)
    outputs, ended = [None, None], [None, None]

    def wait(node):
        outputs[node] = agents[node].communicate(timeout=600)
        ended[node] = time.time()

    threads = [threading.Thread(target=wait, args=(node,)) for node in (0, 1)]
    for thread in threads:
        thread.start()
    out, _, point = jobs[-1].partition("@")
    survivor = 1 if point.startswith(("decision", "freeze")) else 0
    threads[survivor].join()
    lost = os.path.join(out, "lost.json")
    if point.startswith("freeze") and os.path.exists(lost):  # a frozen rank never ends: end it now
        with open(lost) as fh:
            os.kill(json.load(fh)["pid"], signal.SIGKILL)
    threads[1 - survivor].join()
    codes, errors = [a.returncode for a in agents], [err for _, err in outputs]
    if not point:
        return codes, errors, None
    assert os.path.exists(lost), f"no rank was lost at {point}:\n{errors[0][-3000:]}\n{errors[1][-3000:]}"
    return codes, errors, ended[survivor] - json.load(open(lost))["time"]


def check_files(out):
    """Nothing half-written: the history parses, every checkpoint with a trainer state parses."""
    load_history(out / "tikmix" / "history.json")
    for name in os.listdir(out):
        state = out / name / "trainer_state.json"
        if name.startswith("checkpoint-") and state.exists():
            json.loads(state.read_text())
    assert not [f for f in os.listdir(out / "tikmix") if f.startswith(".tmp-")]


def stream(out, rank):
    """The samples ``rank`` trained on, stitched from every attempt (each cut where the next one resumed)."""
    attempts = []
    for i in range(len([f for f in os.listdir(out) if f.startswith(f"seen-rank{rank}-")])):
        with open(out / f"seen-rank{rank}-{i}.jsonl") as fh:
            lines = [json.loads(line) for line in fh]
        attempts.append((lines[0]["resumed_from"], [sid for batch in lines[1:] for sid in batch]))
    samples = []
    for (start, seen), nxt in zip(attempts, attempts[1:] + [(None, None)]):
        assert len(samples) == start * RUN.BATCH
        samples += seen if nxt[0] is None else seen[:(nxt[0] - start) * RUN.BATCH]
    return samples[:RUN.MAX_STEPS * RUN.BATCH]


def test_a_lost_rank_stops_the_other_within_the_bound_and_the_resume_equals_the_uninterrupted_run(tmp_path):
    clean, crashed, frozen = tmp_path / "clean", tmp_path / "crashed", tmp_path / "frozen"

    # 1. Inside stage 1's training window, after checkpoint 4 (taken inside it) was written: the survivor is in
    # the Trainer's own collectives (DDP's buffer broadcast and gradient all-reduce), which gloo fails at once.
    codes, errors, took = launch(str(clean), f"{crashed}@window:4")
    assert codes[0] != 0 and codes[1] != 0, errors
    assert "by peer" in errors[0] and "remote worker" in errors[0]  # gloo: "Connection reset/closed by peer"
    assert "rank      : 1" in errors[1] and "SIGKILL" in errors[1]  # the dead node's agent names the rank
    assert took < DEAD_PEER_BOUND
    check_files(crashed)
    assert latest_checkpoint(crashed).endswith("checkpoint-4")
    assert {f.name for f in (crashed / "checkpoint-4").glob("tikmix_window*")} == {
        "tikmix_window.safetensors", "tikmix_window-rank0.safetensors", "tikmix_window-rank1.safetensors"}

    # 2. In stage 2's probe pass (the window's top-up), resumed from checkpoint 4 inside stage 1's window.
    codes, errors, took = launch(f"{crashed}@probe:2")
    assert codes[0] != 0, errors
    assert "LostRankError: TiKMiX lost contact with rank 1 in the all-reduce of stage 2 at step 10" in errors[0]
    assert "resume from the last complete checkpoint" in errors[0]
    assert took < DEAD_PEER_BOUND
    check_files(crashed)
    assert [s["step"] for s in load_history(crashed / "tikmix" / "history.json")["stages"]] == [5]

    # 3. As stage 3's decision is broadcast, rank 0 (which writes the history and the checkpoints) dies.
    codes, errors, took = launch(f"{crashed}@decision:3")
    assert codes[1] != 0, errors
    assert "LostRankError: TiKMiX lost contact with rank 0 in the broadcast of stage 3 at step 15" in errors[1]
    assert took < DEAD_PEER_BOUND
    check_files(crashed)
    assert [s["step"] for s in load_history(crashed / "tikmix" / "history.json")["stages"]] == [5, 10]

    # 4. The resume to the end; and a rank that freezes (SIGSTOP: no closed connection to see) as a decision is
    # broadcast: the other waits tikmix_collective_timeout, not the process group's 30 minutes.
    codes, errors, took = launch(str(crashed), f"{frozen}@freeze:1")
    assert codes[1] != 0, errors
    assert ("TiKMiX lost contact with rank 0 in the broadcast of stage 1 at step 5 (measuring S and deciding): "
            "rank 1 of 2 gave up after") in errors[1]
    assert f"tikmix_collective_timeout={RUN.FREEZE_TIMEOUT:g} s" in errors[1] and "Timed out" in errors[1]
    assert RUN.FREEZE_TIMEOUT <= took < RUN.FREEZE_TIMEOUT + DEAD_PEER_BOUND
    check_files(frozen)

    reference = load_history(clean / "tikmix" / "history.json")["stages"]
    got = load_history(crashed / "tikmix" / "history.json")["stages"]
    assert [s["step"] for s in got] == [s["step"] for s in reference] == [5, 10, 15]
    for a, b in zip(got, reference):
        assert a["weights_after"] == b["weights_after"]
        assert a["effective_index"] == b["effective_index"]
        assert a["influence"]["scores"] == b["influence"]["scores"]
        assert a["influence"]["window"]["sequences"] == b["influence"]["window"]["sequences"]
    for rank in (0, 1):
        assert stream(crashed, rank) == stream(clean, rank)
