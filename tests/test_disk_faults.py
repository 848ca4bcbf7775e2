"""A full or read-only disk at each of TiKMiX's writes (the history, the training window's files, the checkpoint's
trainer_state.json that holds the callback's state): a clear error, no earlier file damaged, nothing
half-written, and a retry once the disk is fixed resumes. Every write of state is atomic and durable
(docs/reliability.md, "Disk faults")."""

from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from tikmix_hf import _io
from tikmix_hf.history import load_history

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed", "disk_run.py")
FAULTS = [f"{kind}:{write}" for kind in ("full", "readonly") for write in ("history", "window", "state")]


def _respect_permissions() -> None:
    """In the child, before it runs: as root, give up the capabilities that override file permissions, so that a
    read-only folder is read-only to it too (dropping them from the bounding set takes effect at exec)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 3):  # CAP_DAC_OVERRIDE, CAP_FOWNER
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_respect_permissions() -> bool:
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_respect_permissions, check=True, timeout=60)
    except subprocess.SubprocessError:
        return False  # root without the right to drop capabilities (CAP_SETPCAP): no folder is read-only to it
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    faults = FAULTS if _can_respect_permissions() else [f for f in FAULTS if f.startswith("full")]
    proc = subprocess.run([sys.executable, SCRIPT, str(root), "none", *faults], capture_output=True, text=True,
                          timeout=600, preexec_fn=_respect_permissions if faults == FAULTS else None, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def stream(out):
    """The samples trained, stitched from the attempts (each cut where the next resumed)."""
    attempts = json.loads((out / "seen.json").read_text())
    samples = []
    for a, nxt in zip(attempts, attempts[1:] + [None]):
        assert len(samples) == a["resumed_from"] * 4
        samples += a["seen"] if nxt is None else a["seen"][:(nxt["resumed_from"] - a["resumed_from"]) * 4]
    return samples[:12 * 4]


#: What each fault leaves before the retry: the error's words, the stages in history.json, the checkpoint a
#: resume starts from, and whether the resumed run equals the uninterrupted one.
EXPECTED = {
    "history": (["TiKMiX could not write its history to", "tikmix/history.json", "previous history file is left "
                 "intact", "Free disk space or fix the folder's permissions"], [5], "checkpoint-8", True),
    "window": (["TiKMiX could not write the training window's state to", "checkpoint-4/tikmix_window",
                "a resume from it measures this stage with probes", "Free disk space"], [], "checkpoint-4", False),
    "state": (["trainer_state.json"], [5], "checkpoint-4", True),  # the Trainer's own write, half done: skipped
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_full_or_read_only_disk_fails_clearly_damages_nothing_and_a_retry_resumes(runs, fault):
    kind, write = fault.split(":")
    out = runs / f"{kind}-{write}"
    if not out.exists():
        pytest.skip("this root process cannot give up the capabilities that override a folder's permissions")
    record = json.loads((out / "fault.json").read_text())
    words, stages, latest, exact = EXPECTED[write]
    reason = "File too large" if kind == "full" else "Permission denied"
    assert reason in record["error"], record["error"]
    for text in words:
        if not (write == "state" and kind == "full"):  # EFBIG from the Trainer's json write names no file
            assert text in record["error"], (text, record["error"])
    assert record["stages"] == stages and record["latest"].endswith(latest) and record["temporaries"] == []
    reference = load_history(runs / "none" / "tikmix" / "history.json")["stages"]
    got = load_history(out / "tikmix" / "history.json")["stages"]
    assert [s["step"] for s in got] == [s["step"] for s in reference] == [5, 10]  # the retry went to the end
    if exact:
        assert [s["weights_after"] for s in got] == [s["weights_after"] for s in reference]
        assert stream(out) == stream(runs / "none")
    else:  # the stage whose window was not kept is measured with probes, and says why
        assert got[0]["influence"]["window"] is None and any("measured with probes" in w for w in got[0]["warnings"])


@pytest.mark.parametrize("save", ["text", "json", "tensors"])
def test_every_state_write_is_atomic_and_durable(tmp_path, monkeypatch, save):
    """The file is flushed before the rename, its folder after it; a failed write leaves the old file alone."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "fsync", fsync)
    monkeypatch.setattr(_io.os, "replace", replace)
    path = tmp_path / "state.bin"
    write = {"text": lambda: _io.save_text_atomic(path, "new"), "json": lambda: _io.save_json_atomic(path, [1]),
             "tensors": lambda: _io.save_tensors_atomic(path, {"x": torch.ones(2)}, {"k": "v"})}[save]
    write()
    assert events == ["fsync file", "rename", "fsync folder"]
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        write()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.bin"]
