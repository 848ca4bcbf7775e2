"""Hostile input, seeded (Hypothesis with ``derandomize``): every ``--tikmix_*`` flag through ``tikmix train``,
schedule files, a tampered ``history.json`` and a tampered training-window state. Each case is accepted, or
refused with an error that names the flag, the field or the file; never a raw TypeError or a traceback on the
command line (docs/reliability.md, "Fuzzing"). The fields of TiKMiXConfig itself are fuzzed in test_config.py."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tikmix_hf import TiKMiXConfig
from tikmix_hf.callback_state import CallbackState
from tikmix_hf.cli import main
from tikmix_hf.history import HISTORY_FORMAT
from tikmix_hf.influence.window_lifecycle import WINDOW_FILE, WINDOW_GRADIENTS, WindowLifecycle
from tikmix_hf.schedule import load_schedule
from tikmix_hf.testing import named_batches, token_batches, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDED = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
FLAGS = [f.name for f in dataclasses.fields(TiKMiXConfig)]
HOSTILE_TEXT = ["x", "nan", "inf", "-inf", "-1", "0", "1e400", "99999999999999999999999", "", "[1, 2]", "{}",
                '{"a": 1}', "true", "0.5", "none", "1 2", "'", "\\", "\u00e9\u4e2d", "-0", "0x10", "1_000"]
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=4),
                   st.sampled_from([10**400 // 10**300, float("inf"), float("nan"), [], {}]))


def run_cli(argv) -> tuple[int, str]:
    """``tikmix ARGV``'s exit status and stderr; anything escaping ``main`` fails the test (a traceback)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


# ------------------------------------------------------------------------------------------------ tikmix train
@settings(max_examples=300, **SEEDED)
@given(st.lists(st.tuples(st.sampled_from(FLAGS), st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=6))),
                min_size=1, max_size=2))
def test_every_tikmix_flag_through_tikmix_train_is_accepted_or_refused_naming_it(flags):
    """A missing domain file comes after the flags are read: an accepted flag ends there, with that error."""
    argv = ["train", "--output_dir", tempfile.gettempdir(), "--max_steps", "1", "--use_cpu", "--domain",
            "a=/no/such/domain.txt", "--validation", "v=/no/such/validation.txt"]
    for flag, value in flags:
        argv += [f"--{flag}", value]
    code, err = run_cli(argv)
    assert code == 2 and "Traceback" not in err, err
    assert "--domain a=/no/such/domain.txt" in err or any(flag in err for flag, _ in flags), (flags, err)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text("some words of text, over and over again. " * 60)
    (root / "huge.json").write_text('[{"at": 0.0, "weights": {"a": 1, "b": 1}}, {"at": {"steps": 1e999}, '
                                    '"weights": {"a": 1, "b": 1}}]')
    (root / "list.yaml").write_text("- at: {steps: .nan}\n  weights: {a: 1}\n")
    return root


@pytest.mark.parametrize("extra,named", [
    (["--tikmix_initial_weights", '{"zz": 1}'], "unknown domains ['zz']"),
    (["--tikmix_initial_weights", '{"a": -1, "b": 1}'], "tikmix_initial_weights="),
    (["--tikmix_solver", "replay", "--tikmix_schedule", "{root}/huge.json"], "tikmix_schedule="),
    (["--tikmix_solver", "replay", "--tikmix_schedule", "{root}/list.yaml"], "tikmix_schedule="),
    (["--tikmix_solver", "replay", "--tikmix_schedule", "{root}/a.txt"], "tikmix_schedule="),
    (["--tikmix_solver", "doremi", "--tikmix_reference_model", "/no/such/model"], "tikmix_reference_model="),
    pytest.param(["--tikmix_solver", "odm", "--tikmix_odm_exploration", "1"], "tikmix_odm_exploration=",
                 marks=pytest.mark.xfail(strict=True, reason="ODM checks the exploration against 1/K at its first "
                                                             "decision, after training started (mixers/baselines.py)")),
], ids=["unknown-domain", "negative", "huge-position", "nan-position", "not-a-schedule", "no-reference",
        "odm-exploration"])
def test_what_tikmix_train_checks_when_training_starts_is_one_line_naming_the_field(text_files, extra, named):
    code, err = run_cli([
        "train", "--output_dir", str(text_files / "out"), "--max_steps", "2", "--use_cpu", "--report_to", "none",
        "--domain", f"a={text_files / 'a.txt'}", "--domain", f"b={text_files / 'a.txt'}",
        "--validation", f"v={text_files / 'a.txt'}", "--vocab_size", "300", "--block_size", "16", "--model_config",
        "tiny", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
        "--tikmix_show_progress", "false", *[e.replace("{root}", str(text_files)) for e in extra]])
    assert code == 2 and "Traceback" not in err and named in err, err
    assert len([line for line in err.splitlines() if line.startswith("tikmix train: error:")]) == 1


def test_a_flag_value_read_as_another_flag_is_named():
    code, err = run_cli(["train", "--output_dir", tempfile.gettempdir(), "--max_steps", "1", "--tikmix_pareto",
                         "-inf"])
    assert code == 2 and "--tikmix_pareto -inf: a value that starts with '-' is read as another flag" in err


# ------------------------------------------------------------------------------------------------ schedule files
ENTRY = st.fixed_dictionaries({
    "at": st.one_of(LEAVES, st.dictionaries(st.sampled_from(["steps", "tokens", "fraction", "x"]), LEAVES, max_size=2)),
    "weights": st.one_of(LEAVES, st.dictionaries(st.sampled_from(["a", "b", "c", ""]), LEAVES, max_size=3)),
})
DOCUMENTS = st.one_of(
    st.lists(ENTRY, max_size=4),
    st.lists(st.dictionaries(st.sampled_from(["at", "weights", "when", "extra"]), LEAVES, max_size=3), max_size=3),
    LEAVES,
    st.fixed_dictionaries({"format": st.just(HISTORY_FORMAT), "max_steps": LEAVES, "initial_weights": LEAVES,
                           "stages": st.lists(st.dictionaries(st.sampled_from(["step", "weights_after"]), LEAVES,
                                                              max_size=2), max_size=3)}),
)


@settings(max_examples=600, **SEEDED)
@given(DOCUMENTS, st.sampled_from(["json", "yaml"]), st.integers(0, 40))
def test_a_schedule_file_is_read_or_refused_naming_the_file(document, suffix, cut):
    """Wrong types, unknown keys, huge and non-finite positions, truncated files, JSON and YAML."""
    text = json.dumps(document) if suffix == "json" else yaml.safe_dump(document)
    if cut < 10:  # truncated
        text = text[:len(text) * cut // 10]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"schedule.{suffix}")
        with open(path, "w") as fh:
            fh.write(text)
        try:
            schedule = load_schedule(path)
            schedule.check_domains(["a", "b"])
            steps = schedule.resolve_steps(100)
        except ValueError as err:
            assert f"tikmix_schedule={path!r}" in str(err), err
            return
    assert all(0 <= s < 100 for s in steps) and steps == sorted(set(steps))
    assert all(math.isfinite(w) and w >= 0 for p in schedule.phases for w in p.weights.values())


# ------------------------------------------------------------------------------------------------ history.json
def _history() -> dict:
    """A history as a run writes it (two stages, an influence matrix, a mixer account), small."""
    stage = {"stage": 1, "step": 5, "samples_consumed": 40, "tokens_seen": 640, "effective_index": 56,
             "weights_before": {"a": 0.5, "b": 0.5}, "weights_after": {"a": 0.6, "b": 0.4}, "entropy": 0.67,
             "solver": "direct", "status": "converged", "message": "ok",
             "influence": {"scores": [[0.1, -0.2]], "stderr": [[0.01, 0.02]], "task_names": ["v"],
                           "domain_names": ["a", "b"], "domain_tokens": {"a": 10, "b": 10}, "task_tokens": {"v": 5},
                           "domain_losses": {"a": 3.0, "b": 3.1}, "task_losses": {"v": 3.2}, "window": None},
             "solver_result": {"status": "converged", "weights": [0.6, 0.4]}, "mixer": {}, "metrics": {},
             "seconds": {"influence": 0.1, "solve": 0.01, "total": 0.2}, "warnings": [], "notes": []}
    second = json.loads(json.dumps(stage)) | {"stage": 2, "step": 10, "weights_before": {"a": 0.6, "b": 0.4}}
    return {"format": HISTORY_FORMAT, "domains": ["a", "b"], "tasks": ["v"], "config": {"tikmix_solver": "direct"},
            "initial_weights": {"a": 0.5, "b": 0.5}, "alignment": None, "max_steps": 20, "stages": [stage, second]}


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


PATHS = list(_paths(_history()))[1:]
EDITS = st.lists(st.tuples(st.sampled_from(PATHS), LEAVES, st.booleans()), min_size=1, max_size=3)


def tampered(edits, cut) -> str:
    doc = _history()
    for path, value, delete in edits:
        node = doc
        with contextlib.suppress(KeyError, IndexError, TypeError):
            for key in path[:-1]:
                node = node[key]
            if delete and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    text = json.dumps(doc)
    return text if cut >= 8 else text[:len(text) * cut // 8]


@pytest.mark.parametrize("command,examples", [("export", 250), ("plot", 8)])
def test_a_tampered_history_is_read_or_refused_naming_the_file(tmp_path, command, examples):
    @settings(max_examples=examples, **SEEDED)
    @given(EDITS, st.integers(0, 40))
    def check(edits, cut):
        path = tmp_path / "history.json"
        path.write_text(tampered(edits, cut))
        argv = (["schedule", "export", str(path), "-o", str(tmp_path / "schedule.json")] if command == "export"
                else ["plot", str(path), "--output-dir", str(tmp_path / "plots")])
        code, err = run_cli(argv)
        assert code == 0 or (code == 2 and str(path) in err and "Traceback" not in err), err

    check()


# ------------------------------------------------------------------------------------------------ window state
@pytest.fixture(scope="module")
def saved_window(tmp_path_factory):
    """A training window that read two micro-batches, saved as a checkpoint keeps it."""
    folder = tmp_path_factory.mktemp("window")
    model = toy_model(0, torch.float64)
    validation = named_batches(["v"], 1, seed=5)
    lifecycle = WindowLifecycle("training", strict=False, preconditioner="identity")
    lifecycle.plan({2: 4})
    ids = [np.array([0, 1, 0]), np.array([1, 1, 0])]
    assert lifecycle.open(2, model, validation, ["a", "b"], None, lambda k, rows: (ids[k], 0),
                          show_progress=False) is None
    for batch in token_batches(2, batch_size=3, seed=9):
        model(**batch).loss.backward()
    lifecycle.save(str(folder))
    lifecycle.drop()
    return folder, model, validation


def _restore(folder, model, validation, saved=None):
    """Restore the window in ``folder``; where it restores, read one more micro-batch and measure ``S``."""
    lifecycle = WindowLifecycle("training", strict=False, preconditioner="identity")
    note = lifecycle.restore(str(folder), saved or {"opened_at": 2}, model, validation, ["a", "b"],
                             lambda opened_at: (lambda k, rows: (np.zeros(rows, dtype=np.int64), 0)), step=3,
                             micro_steps=1, show_progress=False, saved_source="training")
    if note is None:
        (batch,) = token_batches(1, batch_size=3, seed=11)
        model(**batch).loss.backward()
        closed, close_note = lifecycle.close()
        if closed is not None:
            closed[0].result(named_batches(["a", "b"], 1, seed=3))
        model.zero_grad()
    lifecycle.drop()
    return note


def test_the_saved_window_restores(saved_window):
    assert _restore(*saved_window) is None


@settings(max_examples=120, **SEEDED)
@given(st.sampled_from([WINDOW_GRADIENTS, WINDOW_FILE.format(rank=0)]),
       st.sampled_from(["format", "micro_batches", "units", "quota", "taken", "full", "hook_seconds", "tasks",
                        "validation_seconds", "preconditioner", "preconditioner_used", "fallback", "task_losses",
                        "parameters", "domains", "rank", "world", "non_finite", "opened_at"]),
       LEAVES, st.booleans(), st.sampled_from([None, "rows", "cell", "dom", "loss_sums", "sequences"]),
       st.integers(0, 30))
def test_a_tampered_window_state_falls_back_to_probes_naming_the_file(saved_window, name, key, value, delete,
                                                                      tensor, cut):
    """Its metadata (keys, types, values), its tensors (shapes, dtypes) or its bytes (truncated): every case
    restores, or measures the stage with probes and says why; none raises."""
    source, model, validation = saved_window
    with tempfile.TemporaryDirectory() as folder:
        for file in (WINDOW_GRADIENTS, WINDOW_FILE.format(rank=0)):
            shutil.copy(source / file, folder)
        path = os.path.join(folder, name)
        with safe_open(path, framework="pt") as fh:
            info = dict(fh.metadata())
        tensors = load_file(path)
        if key == "opened_at":
            info["opened_at"] = str(value)
        else:
            meta = json.loads(info["tikmix"])
            meta.pop(key) if delete else meta.__setitem__(key, value)
            info["tikmix"] = json.dumps(meta)
        if tensor in tensors:
            tensors[tensor] = torch.zeros(3, dtype=torch.float32)
        save_file(tensors, path, metadata=info)
        if cut < 5:
            with open(path, "rb") as fh:
                data = fh.read()
            with open(path, "wb") as fh:
                fh.write(data[:len(data) * cut // 5])
        note = _restore(folder, model, validation)
    assert note is None or ("measured with probes" in note and folder in note), note


@settings(max_examples=300, **SEEDED)
@given(st.sampled_from(["format", "stage", "step", "tokens_prev", "tasks", "mixture", "mixer", "history", "window",
                        "influence_source", "alignment", "initial_weights"]),
       st.one_of(LEAVES, st.dictionaries(st.sampled_from(["opened_at", "name", "state", "position"]), LEAVES,
                                         max_size=2)), st.booleans())
def test_a_tampered_callback_state_is_read_or_refused_naming_it(key, value, delete):
    saved = CallbackState(stage=1, step=6, tokens_prev=0, tasks=["v"], mixture={"position": 48}, mixer_name="direct",
                          window={"opened_at": 4}).to_json()
    saved.pop(key) if delete else saved.__setitem__(key, value)
    try:
        CallbackState.from_json(saved)
    except ValueError as err:
        assert "TiKMiXCallback state" in str(err), err


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), 1e10, True, "600", [600]])
def test_the_collective_timeout_is_a_number_of_seconds(value):
    with pytest.raises(ValueError, match=r"tikmix_collective_timeout=.*: must be a number of seconds in \(0, 1e9\]"):
        TiKMiXConfig(tikmix_collective_timeout=value)
    assert TiKMiXConfig(tikmix_collective_timeout=None).tikmix_collective_timeout is None
