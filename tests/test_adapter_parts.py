"""The callback's pure parts, without training: stage planning, loader arithmetic, the stage record and
its metrics, the checkpoint state, and the probe draw."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tikmix_hf.batching import draw_probes, log_key
from tikmix_hf.callback_state import STATE_FORMAT, CallbackState
from tikmix_hf.config import TiKMiXConfig
from tikmix_hf.loader import LoaderGeometry
from tikmix_hf.mixers import StagePlan
from tikmix_hf.stage_record import StageRecord, StageSeconds, entropy, stage_metrics, stage_notes
from tikmix_hf.stages import Stages, plan_stages, plan_windows

# --------------------------------------------------------------------------------------------------
# Stage planning


def test_default_fractions_of_each_objective():
    assert plan_stages(TiKMiXConfig(), 400).steps == {20, 100, 200, 300}
    assert plan_stages(TiKMiXConfig(tikmix_objective="paper"), 400).steps == {100, 200, 300}


def test_every_n_steps_plus_an_early_warmup_decision():
    stages = plan_stages(TiKMiXConfig(tikmix_stage_steps=30, tikmix_warmup_steps=7), 100)
    assert stages.steps == {7, 30, 60, 90} and not stages.warnings


def test_settings_that_leave_no_boundary_say_so():
    (message,) = plan_stages(TiKMiXConfig(tikmix_stage_steps=50), 50).warnings
    assert "tikmix_stage_steps=50" in message and "will not change" in message
    (message,) = plan_stages(TiKMiXConfig(tikmix_stage_fractions=[0.5]), 1).warnings
    assert "fractions [0.5]" in message
    stages = plan_stages(TiKMiXConfig(tikmix_stage_steps=10, tikmix_warmup_steps=40), 40)
    assert stages.steps == {10, 20, 30} and "tikmix_warmup_steps=40" in stages.warnings[0]


def test_a_mixers_own_plan_replaces_the_configured_stages():
    plan = StagePlan(steps=[5, 9], initial={"a": 1.0})
    stages = plan_stages(TiKMiXConfig(tikmix_stage_steps=2, tikmix_warmup_steps=1), 20, plan)
    assert stages.steps == {5, 9} and stages.initial == {"a": 1.0} and not stages.counts_tokens


def test_token_periods_and_marks_are_crossed_once_each():
    period = plan_stages(TiKMiXConfig(tikmix_stage_tokens=1000), 100)
    assert period.counts_tokens and period.steps == frozenset()
    assert [period.crossed(a, b) for a, b in [(0, 999), (999, 1000), (1000, 1999), (1500, 3100)]] == [
        False, True, False, True]
    marks = Stages(token_marks=(500, 2000))
    assert [marks.crossed(a, b) for a, b in [(0, 499), (499, 500), (500, 1999), (1999, 2500), (2500, 9000)]] == [
        False, True, False, True, False]


def test_next_boundary_is_the_next_step_or_one_token_period_on():
    stages = Stages(steps=frozenset({10, 30}))
    assert [stages.next_boundary(s, 50, 0) for s in (0, 10, 29, 30)] == [10, 30, 30, 50]
    tokens = Stages(token_period=1000)
    assert tokens.next_boundary(10, 100, tokens_seen=2000) == 15  # 200 tokens a step: 1000 more in 5 steps
    assert tokens.next_boundary(0, 100, tokens_seen=0) == 100


def test_windows_span_at_most_half_a_stage_and_the_configured_steps():
    assert plan_windows({20, 100, 200, 300}, 32) == {10: 20, 68: 100, 168: 200, 268: 300}
    assert plan_windows({3, 4}, 32) == {2: 3, 3: 4}  # never shorter than one step
    assert plan_windows(set(), 32) == {}


# --------------------------------------------------------------------------------------------------
# Loader arithmetic


def test_consumed_samples_and_the_micro_batches_of_each_rank():
    g = LoaderGeometry(micro_global=8, grad_accum=2)
    assert g.consumed(3) == 48 and g.rows_per_rank(2) == 4
    # rank 1's micro-batch 3 since step 5: 5 steps x 16, 3 micro-steps x 8, then rank 0's 4 rows
    assert g.micro_batch_start(5, 3, 1, 2) == 80 + 24 + 4


def test_resume_starts_at_the_position_or_at_the_epochs_start_for_a_replay():
    g = LoaderGeometry(micro_global=4, grad_accum=2, steps_per_epoch=10)
    assert g.resume_start(23, ignore_data_skip=True, max_steps=100) == 184
    assert g.resume_start(23, ignore_data_skip=False, max_steps=100) == 184 - 3 * 2 * 4  # 3 steps into epoch 2
    lengthless = LoaderGeometry(micro_global=4, grad_accum=2)
    assert lengthless.resume_start(23, ignore_data_skip=False, max_steps=100) == 0


def test_the_domain_reader_maps_micro_batches_to_stream_samples_and_refuses_other_row_counts():
    g = LoaderGeometry(micro_global=6)
    calls = []
    reader = g.domain_reader(2, lambda lo, hi: calls.append((lo, hi)) or np.arange(lo, hi), rank=1, world=2)
    ids, offset = reader(1, 3)  # the micro-step of all ranks: step 2 x 6 + 1 x 6 on; rank 1's rows from 3
    np.testing.assert_array_equal(ids, np.arange(18, 24))
    assert offset == 3 and calls == [(18, 24)]
    with pytest.raises(ValueError, match="has 5 sequences where the stream gives each rank 3"):
        reader(0, 5)


# --------------------------------------------------------------------------------------------------
# The stage record and its metrics


def _record(**kw) -> StageRecord:
    after = kw.pop("after", {"a/b": 0.7, "c": 0.3})
    base = dict(stage=2, step=40, samples_consumed=640, tokens_seen=None, effective_index=700,
                weights_before={"a/b": 0.5, "c": 0.5}, weights_after=after, entropy=entropy(after),
                solver="direct", status="converged", message="ok",
                influence={"task_names": ["t 1"], "domain_names": ["a/b", "c"], "scores": [[1.5, -2.0]]},
                solver_result=None, mixer={}, metrics={"trust_radius": 0.2, "predicted_gain": {"t 1": 0.3, "x": None}},
                seconds=StageSeconds(influence=1.0, solve=0.5, total=2.0))
    base.update(kw)
    return StageRecord(**base)


def test_stage_metrics_flatten_the_record_with_safe_names():
    logs = stage_metrics(_record())
    assert logs == {
        "tikmix/stage": 2.0, "tikmix/weight/a_b": 0.7, "tikmix/weight/c": 0.3,
        "tikmix/entropy": pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3))),
        "tikmix/status": 0.0, "tikmix/seconds": 2.0, "tikmix/seconds_influence": 1.0,
        "tikmix/trust_radius": 0.2, "tikmix/predicted_gain/t_1": 0.3,
        "tikmix/influence/t_1/a_b": 1.5, "tikmix/influence/t_1/c": -2.0,
    }
    assert not any(k.startswith("tikmix/influence") for k in stage_metrics(_record(), log_matrix=False))
    assert stage_metrics(_record().to_dict()) == logs  # the history entry gives the same metrics
    assert log_key("val:code/x y") == "val_code_x_y"


def test_stage_notes_warn_of_collapse_and_of_a_skipped_decision():
    assert stage_notes(_record(), 0.5) == []
    collapsed = _record(after={"a/b": 0.99, "c": 0.01})
    (note,) = stage_notes(collapsed, 0.5)
    assert "collapsing" in note and f"{collapsed.entropy:.3f}" in note
    skipped = _record(status="skipped", message="influence not measured")
    assert stage_notes(skipped, 0.0) == ["influence not measured"]


# --------------------------------------------------------------------------------------------------
# The checkpoint state


def _state() -> CallbackState:
    return CallbackState(stage=1, step=12, tokens_prev=0, tasks=["t"], mixture={"position": 96}, mixer_name="direct",
                         mixer_state={"x": 1}, initial_weights={"a": 1.0}, history=[{"stage": 1}],
                         window={"opened_at": 9}, influence_source="training")


def test_the_state_round_trips_through_json():
    doc = _state().to_json()
    assert doc["format"] == STATE_FORMAT
    assert CallbackState.from_json(doc) == _state()


@pytest.mark.parametrize("tamper, match", [
    (lambda d: d.update(format="pickle"), "not in format"),
    (lambda d: d.pop("stage"), "damaged"),
    (lambda d: d.update(step=-1), "damaged"),
    (lambda d: d.update(step=True), "damaged"),
    (lambda d: d.update(window={"opened_at": "9"}), "damaged"),
    (lambda d: d.update(mixture={"position": "96"}), "no stream position"),
])
def test_a_tampered_state_is_refused(tamper, match):
    doc = _state().to_json()
    tamper(doc)
    with pytest.raises(ValueError, match=match):
        CallbackState.from_json(doc)


def test_a_state_of_another_run_is_refused_with_the_fix():
    state = _state()
    with pytest.raises(ValueError, match=r"validation tasks \['t'\] but this run has \['u'\]"):
        state.check_resumable(tasks=["u"], mixer_name="direct")
    with pytest.raises(ValueError, match="tikmix_solver='direct' but this run uses 'odm'"):
        state.check_resumable(tasks=["t"], mixer_name="odm")
    state.check_position(96, 12, 8)
    with pytest.raises(ValueError, match="position 96 does not match step 12 x 4 samples per step"):
        state.check_position(48, 12, 4)


# --------------------------------------------------------------------------------------------------
# The probe draw


class _Mixture:
    domains = ("a", "b", "c")

    def probe(self, domain, n, round):
        return [f"{domain}{round}-{i}" for i in range(n)]


def test_probes_are_drawn_per_domain_or_only_as_a_windows_top_up():
    assert draw_probes(_Mixture(), 2, cap=None, seen=None, round=1) == {
        "a": ["a1-0", "a1-1"], "b": ["b1-0", "b1-1"], "c": ["c1-0", "c1-1"]}
    seen = {"a": {"sequences": 5}, "b": {"sequences": 1}, "c": {"sequences": 0}}
    assert draw_probes(_Mixture(), 2, cap=None, seen=seen, round=0) == {"b": ["b0-0"], "c": ["c0-0", "c0-1"]}
    assert draw_probes(_Mixture(), 2, cap=3, seen=None, round=0)["a"] == ["a0-0", "a0-1", "a0-2"]
    assert draw_probes(_Mixture(), 0, cap=None, seen=None, round=0) == {"a": [], "b": [], "c": []}


def test_the_general_task_samples_the_natural_mixture_and_joins_the_tasks():
    from tikmix_hf import DomainMixture, TiKMiXCallback
    from tikmix_hf.batching import GENERAL_ROUND, general_task
    from tikmix_hf.testing import toy_domains, toy_validation

    domains = toy_domains()
    domains["noise"] = domains["noise"][:64]  # natural weights 256 : 256 : 64
    mixture = DomainMixture(domains, weights="uniform", seed=3)
    examples = general_task(mixture, 10)
    kinds = [e["sid"].split(":")[0] for e in examples]
    # 4.44, 4.44 and 1.11 by largest remainder: the tie goes to the first domain
    assert [kinds.count(d) for d in ("pattern", "echo", "noise")] == [5, 4, 1]
    assert examples[0] == mixture.probe("pattern", 1, round=GENERAL_ROUND)[0]
    config = TiKMiXConfig(tikmix_general_sequences=10, tikmix_stage_steps=4, tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config)
    assert list(callback.validation) == ["held_out_pattern", "general"]
    with pytest.raises(ValueError, match="task named 'general'"):
        TiKMiXCallback(mixture, {"general": toy_validation()["held_out_pattern"]}, config)
    with pytest.raises(ValueError, match="tikmix_general_sequences"):
        TiKMiXConfig(tikmix_general_sequences=-1)
