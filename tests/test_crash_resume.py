"""Kill a TiKMiX run with SIGKILL at many moments, resume each time: as if it never stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tikmix_hf.history import latest_checkpoint, load_history

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "distributed", "crash_run.py")
BATCH = 8


def start(out, kill=None) -> subprocess.Popen:
    cmd = [sys.executable, SCRIPT, str(out)] + ([kill] if kill else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(out, kill=None, proc=None):
    proc = proc or start(out, kill)
    _, stderr = proc.communicate(timeout=600)
    if kill:
        assert proc.returncode == -signal.SIGKILL, \
            f"{kill}: expected a SIGKILL, got {proc.returncode}\n{stderr[-3000:]}"
    else:
        assert proc.returncode == 0, stderr[-3000:]


def stream(out):
    """The samples the model consumed, stitched from every attempt's record (each cut where the next resumed)."""
    attempts = []
    for i in range(len([f for f in os.listdir(out) if f.startswith("seen-")])):
        with open(os.path.join(out, f"seen-{i}.jsonl")) as fh:
            lines = [json.loads(line) for line in fh]
        attempts.append((lines[0]["resumed_from"], [sid for batch in lines[1:] for sid in batch]))
    samples = []
    for (start, seen), nxt in zip(attempts, attempts[1:] + [(None, None)]):
        assert len(samples) == start * BATCH
        keep = None if nxt[0] is None else (nxt[0] - start) * BATCH
        samples += seen if keep is None else seen[:keep]
    return samples


def check_files(out):
    history = os.path.join(out, "tikmix", "history.json")
    if os.path.exists(history):
        load_history(history)  # parses: never half-written
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(path, "trainer_state.json")):
            with open(os.path.join(path, "trainer_state.json")) as fh:
                json.load(fh)


@pytest.mark.slow
def test_sigkill_at_five_moments_then_resume_equals_uninterrupted(tmp_path):
    clean = tmp_path / "clean"
    uninterrupted = start(clean)  # runs beside the crashed attempts: it shares nothing with them
    crashed = tmp_path / "crashed"
    # Each kill lies after the checkpoint the previous attempt resumes from (checkpoints every 4 steps,
    # stages every 5, S read in the training window of the 2 steps before each): mid-checkpoint, so that
    # the next attempt resumes from checkpoint 4, inside a window; mid-measurement, mid-history-write,
    # between boundaries, and in the measurement of the last stage.
    kills = ["checkpoint:8", "influence:2", "history:3", "step:18", "influence:1"]
    for kill in kills:
        run(crashed, kill)
        check_files(crashed)
    run(crashed)
    run(clean, proc=uninterrupted)
    reference = load_history(clean / "tikmix" / "history.json")
    assert latest_checkpoint(crashed).endswith("checkpoint-24")
    assert (crashed / "checkpoint-4" / "tikmix_window-rank0.safetensors").is_file()
    got = load_history(crashed / "tikmix" / "history.json")
    assert [s["step"] for s in got["stages"]] == [s["step"] for s in reference["stages"]] == [5, 10, 15, 20]
    for a, b in zip(got["stages"], reference["stages"]):
        assert a["weights_after"] == b["weights_after"]
        assert a["effective_index"] == b["effective_index"]
        assert a["influence"]["scores"] == b["influence"]["scores"]
    assert stream(crashed) == stream(clean)
    assert not [f for f in os.listdir(crashed / "tikmix") if f.startswith(".tmp-")]
