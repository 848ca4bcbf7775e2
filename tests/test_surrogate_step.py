"""TiKMiX-M's look-ahead step calibration: a climb on the grid ``lr * 4**k`` that remembers its peak."""

from __future__ import annotations

import json
import math

import pytest

from tikmix_hf.config import TiKMiXConfig
from tikmix_hf.mixers import build_mixer
from tikmix_hf.mixers.tikmix import TiKMiXSurrogate

LR = 1e-3


def peaked(at: float, calls: list):
    """A drop that is largest at ``LR * 4**at`` and falls on both sides, recording the steps it was asked."""

    def drop(step: float) -> float:
        calls.append(round(math.log(step / LR, 4)))
        return 10.0 - (math.log(step / LR, 4) - at) ** 2

    return drop


@pytest.mark.parametrize("peak, tried", [(3, [0, 1, 2, 3, 4]), (-2, [0, 1, -1, -2, -3]), (0, [0, 1, -1])])
def test_the_climb_finds_the_peak_from_the_learning_rate(peak, tried):
    calls = []
    step, grid = TiKMiXSurrogate().calibrate_step(LR, peaked(peak, calls))
    assert step == pytest.approx(LR * 4.0**peak, rel=1e-12)
    assert calls == tried
    assert sorted(grid, key=float) == [f"{LR * 4.0**k:.3g}" for k in sorted(tried)]


def test_a_later_stage_starts_where_the_last_peak_was():
    mixer, calls = TiKMiXSurrogate(), []
    mixer.calibrate_step(LR, peaked(-2, calls))
    calls.clear()
    step, _ = mixer.calibrate_step(LR, peaked(-2, calls))
    assert step == pytest.approx(LR * 4.0**-2) and calls == [-2, -1, -3]
    calls.clear()
    step, _ = mixer.calibrate_step(LR, peaked(1, calls))  # the landscape moved: the climb follows it
    assert step == pytest.approx(LR * 4.0) and calls == [-2, -1, 0, 1, 2]


def test_the_grid_ends_at_its_bounds():
    lowest, highest = TiKMiXSurrogate.STEP_EXPONENTS[0], TiKMiXSurrogate.STEP_EXPONENTS[-1]
    assert TiKMiXSurrogate().calibrate_step(LR, peaked(40, []))[0] == pytest.approx(LR * 4.0**highest)
    assert TiKMiXSurrogate().calibrate_step(LR, peaked(-40, []))[0] == pytest.approx(LR * 4.0**lowest)


def test_a_non_finite_look_ahead_counts_as_no_drop_and_none_finite_is_an_error():
    def diverges_above_lr_times_4(step: float) -> float:
        if step > LR * 4.5:
            raise FloatingPointError("look-ahead loss is nan")
        return step  # still growing where it diverges

    step, grid = TiKMiXSurrogate().calibrate_step(LR, diverges_above_lr_times_4)
    assert step == pytest.approx(LR * 4.0) and sorted(grid, key=float) == ["0.001", "0.004"]

    def never_finite(step: float) -> float:
        raise FloatingPointError(f"look-ahead loss is nan at {step}")

    with pytest.raises(FloatingPointError, match="look-ahead loss is nan"):
        TiKMiXSurrogate().calibrate_step(LR, never_finite)


def test_the_remembered_peak_resumes_exactly_through_json():
    config = TiKMiXConfig(tikmix_solver="surrogate")
    first = build_mixer(config)
    first.calibrate_step(LR, peaked(-3, []))
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"lookahead_step_exponent": -3}
    resumed = build_mixer(config)
    resumed.load_state_dict(state)
    calls_a, calls_b = [], []
    assert first.calibrate_step(LR, peaked(-1, calls_a)) == resumed.calibrate_step(LR, peaked(-1, calls_b))
    assert calls_a == calls_b == [-3, -2, -1, 0]
    with pytest.raises(ValueError, match="unknown mixer state"):
        build_mixer(config).load_state_dict({"lookahead_step_exponent": 1, "other": 2})
