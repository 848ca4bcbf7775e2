"""Faults during a real run: NaN probes, exhausted domains, a failing disk, bad resumes, tampered state."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from test_callback import START, build, make_args
from transformers import Trainer

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import load_history
from tikmix_hf.testing import RecordingCollator, tiny_llama, toy_domains, toy_model, toy_validation

HERE = os.path.dirname(__file__)
SRC = pathlib.Path(HERE).parent / "src" / "tikmix_hf"
POISON = 64  # a token id no toy domain uses (the toy vocabulary is 0..63)


def poisoned_model():
    """A tiny Llama with one extra token whose embedding is NaN: any sequence containing it gives NaN."""
    model = tiny_llama(POISON + 1, hidden_size=32, layers=2, heads=2, block_size=16, seed=0, intermediate_size=64,
                       tie_word_embeddings=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    return model


def poisoned_domains():
    domains = toy_domains()
    domains["poison"] = [
        {"input_ids": [POISON] * 16, "attention_mask": [1] * 16, "labels": [POISON] * 16, "sid": f"poison:{i}"}
        for i in range(8)
    ]
    return domains


def test_nan_in_a_probe_loss_keeps_the_weights_and_says_why(tmp_path):
    weights = {**START, "poison": 0.0}  # never trained on, but probed like every domain
    mixture = DomainMixture(poisoned_domains(), weights=weights, seed=3)
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_steps=5, tikmix_show_progress=False))
    trainer = Trainer(model=poisoned_model(), args=make_args(tmp_path, max_steps=7), train_dataset=mixture,
                      data_collator=RecordingCollator(), callbacks=[callback])
    callback.bind(trainer)
    with pytest.warns(UserWarning, match="influence not measured.*poison"):
        trainer.train()
    (stage,) = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert stage["status"] == "skipped" and "poison" in stage["message"]
    assert stage["weights_after"] == pytest.approx(stage["weights_before"])
    assert all(np.isfinite(list(stage["weights_after"].values())))
    logged = [e for e in trainer.state.log_history if "tikmix/status" in e]
    assert logged[0]["tikmix/status"] == 3.0  # skipped


def test_exhausted_domain_with_stop_policy_ends_the_stream_cleanly(tmp_path):
    small = {name: examples[:12] for name, examples in toy_domains().items()}
    mixture = DomainMixture(small, weights="uniform", seed=3, exhausted="stop")
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_steps=2, tikmix_show_progress=False))
    collator = RecordingCollator()
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=50), train_dataset=mixture,
                      data_collator=collator, callbacks=[callback])
    callback.bind(trainer)
    with pytest.warns(UserWarning, match=r"run out of examples.*training stops at step"):
        trainer.train()
    assert trainer.state.global_step < 50  # training stopped before the stream did
    per = {d: sum(1 for s in collator.seen[: trainer.state.global_step * 8] if s.startswith(d + ":")) for d in small}
    assert all(v <= 12 for v in per.values())
    assert mixture.exhausted_domains((trainer.state.global_step + 1) * 8)


def test_all_zero_influence_keeps_the_prior():
    from tikmix_hf import solve_direct

    result = solve_direct(np.zeros((2, 3)), np.array([0.2, 0.3, 0.5]))
    assert result.status == "fallback" and np.array_equal(result.weights, [0.2, 0.3, 0.5])


FULL_DISK = r"""
import os, resource, signal, sys
sys.path.insert(0, {here!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
from transformers import Trainer, TrainerCallback
from test_callback import build

class FillDisk(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 11:  # after stage 1 was written: no file may grow past 1 KiB any more
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

trainer, callback, *_ = build({out!r}, args_kw=dict(max_steps=22))
trainer.add_callback(FillDisk())
trainer.train()
"""


def test_full_disk_while_writing_history_fails_clearly_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.format(here=HERE, out=str(out))],
                          capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode != 0
    assert "could not write its history" in proc.stderr and "previous history file is left intact" in proc.stderr
    history = load_history(out / "tikmix" / "history.json")  # still valid JSON, with stage 1
    assert [s["step"] for s in history["stages"]] == [10]
    assert not [f for f in os.listdir(out / "tikmix") if f.startswith(".tmp-")]


def _checkpointed_run(out):
    trainer, callback, *_ = build(out, args_kw=dict(max_steps=12, save_strategy="steps", save_steps=12))
    trainer.train()
    return out / "checkpoint-12"


def test_resume_with_other_domains_or_tasks_names_them(tmp_path):
    ckpt = _checkpointed_run(tmp_path)
    domains = toy_domains()
    domains["extra"] = domains["echo"]
    mixture = DomainMixture(domains, weights="uniform", seed=3)
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_steps=10,
                                                                      tikmix_show_progress=False))
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=20), train_dataset=mixture,
                      data_collator=RecordingCollator(), callbacks=[callback])
    callback.bind(trainer)
    with pytest.raises(ValueError, match=r"new: \['extra'\]"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    other_tasks = {"another_task": toy_validation()["held_out_pattern"]}
    callback = TiKMiXCallback(mixture, other_tasks, TiKMiXConfig(tikmix_stage_steps=10, tikmix_show_progress=False))
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=20), train_dataset=mixture,
                      data_collator=RecordingCollator(), callbacks=[callback])
    callback.bind(trainer)
    with pytest.raises(ValueError, match=r"validation tasks \['held_out_pattern'\].*\['another_task'\]"):
        trainer.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.parametrize(
    "tamper,match",
    [
        (lambda s: s.update(format="pickle"), "not in format"),
        (lambda s: s["mixture"].update(cursors=[0, 0, 0]), "cursors"),
        (lambda s: s["mixture"]["schedule"].append([10**6, [1.0, 1.0, 1.0]]), "simplex"),
        (lambda s: s["mixture"].update(position=1), "do not match the weight swaps at position 1"),
    ],
    ids=["format", "cursors", "schedule", "position"],
)
def test_tampered_checkpoint_state_is_refused_before_anything_changes(tmp_path, tamper, match):
    ckpt = _checkpointed_run(tmp_path)
    path = ckpt / "trainer_state.json"
    doc = json.loads(path.read_text())
    tamper(doc["stateful_callbacks"]["TiKMiXCallback"]["attributes"]["tikmix"])
    path.write_text(json.dumps(doc))
    trainer, callback, collator, catcher, mixture = build(tmp_path, args_kw=dict(max_steps=20))
    swaps_before = mixture.swaps
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert mixture.swaps == swaps_before


def test_collapse_guards_and_entropy_warning(tmp_path):
    loose = TiKMiXConfig(tikmix_stage_steps=5, tikmix_show_progress=False, tikmix_gamma=0.0,
                         tikmix_entropy_warning=0.99)
    trainer, callback, *_ = build(tmp_path / "loose", loose, args_kw=dict(max_steps=7))
    with pytest.warns(UserWarning, match="collapsing"):
        trainer.train()
    assert callback.history[0]["warnings"]
    guarded = TiKMiXConfig(tikmix_stage_steps=5, tikmix_show_progress=False, tikmix_gamma=0.0,
                           tikmix_floor=0.1, tikmix_max_change=0.15)
    trainer, callback, *_ = build(tmp_path / "guarded", guarded, args_kw=dict(max_steps=7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    (stage,) = callback.history
    for d, w in stage["weights_after"].items():
        assert w >= 0.1 - 1e-9
        assert abs(w - stage["weights_before"][d]) <= 0.15 + 1e-9


def _torch_load_calls(text: str) -> list[str]:
    """The argument text of every ``torch.load(...)`` call in ``text``."""
    calls, start = [], text.find("torch.load(")
    while start >= 0:
        depth = 0
        for end in range(start + len("torch.load"), len(text)):  # from the "(" found
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[start:end + 1])
        start = text.find("torch.load(", end)
    return calls


def test_nothing_we_save_or_load_is_a_pickle():
    """Not in the package, nor in the notebooks, benchmarks, scripts and tests that show how to use it."""
    root = SRC.parents[1]
    files = [p for folder in ("src", "notebooks", "benchmarks", "scripts", "tests") for p in (root / folder).rglob("*")
             if p.suffix in (".py", ".ipynb", ".sh") and p != pathlib.Path(__file__)]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.suffix == ".sh" for p in files)
    offenders = []
    for path in files:
        text = path.read_text()
        where = path.relative_to(root)
        for needle in ("import pickle", "pickle.", "torch.save(", "np.save(", "allow_pickle=True"):
            if needle in text:
                offenders.append(f"{where}: {needle}")
        offenders += [f"{where}: {call} without weights_only=True" for call in _torch_load_calls(text)
                      if "weights_only=True" not in call]
    assert offenders == []


def test_non_finite_lookahead_in_tikmix_m_skips_the_stage_and_training_goes_on(tmp_path, monkeypatch):
    import tikmix_hf.mixers.tikmix as tikmix_mixers

    def diverging(self, *args, **kwargs):
        raise FloatingPointError("look-ahead loss is nan")

    monkeypatch.setattr(tikmix_mixers.Lookahead, "gains", diverging)
    config = TiKMiXConfig(tikmix_solver="surrogate", tikmix_stage_steps=5, tikmix_surrogate_candidates=16,
                          tikmix_show_progress=False)
    trainer, callback, *_ = build(tmp_path, config, args_kw=dict(max_steps=12))
    with pytest.warns(UserWarning, match="look-ahead not finite"):
        trainer.train()
    assert trainer.state.global_step == 12  # training went on past both stages
    stages = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert [s["status"] for s in stages] == ["skipped", "skipped"]
    assert all("look-ahead not finite" in s["message"] for s in stages)
    assert all(s["weights_after"] == s["weights_before"] for s in stages)
