"""The checks every layer shares (tikmix_hf.validation): one rule, one message, wherever a value comes in."""

from __future__ import annotations

import numpy as np
import pytest

from tikmix_hf.solvers import temperature_weights
from tikmix_hf.solvers.trust_region import solve_trust_region
from tikmix_hf.validation import (
    NONNEGATIVE,
    POSITIVE,
    Range,
    as_float64,
    check_mixture,
    check_number,
    check_positive,
    check_unit,
    check_weights,
    off_simplex,
)


@pytest.mark.parametrize("rule, good, bad", [
    (POSITIVE, [1e-300, 3, np.float32(0.5), np.int64(2)], [0, -1, True, "0.5", float("nan"), float("inf"), 10**400]),
    (NONNEGATIVE, [0, 0.0, 1e308], [-1e-300, False, None, [1.0]]),
    (Range(0, 1, high_open=True), [0, 0.5], [1, 1.0, -0.0001]),
    (Range(low=1, integer=True), [1, np.int64(5), 10**400], [0, 1.0, True, "1"]),
])
def test_a_range_holds_for_numbers_of_its_kind_within_its_bounds(rule, good, bad):
    assert all(rule.holds(v) for v in good) and not any(rule.holds(v) for v in bad)


def test_a_range_says_what_it_needs():
    assert POSITIVE.describe() == "a finite number > 0" and NONNEGATIVE.describe() == "a finite number >= 0"
    assert Range(0, 1, low_open=True).describe() == "a number in (0, 1]"
    assert Range(low=10, integer=True).describe() == "an integer >= 10"
    assert Range(high=2).describe() == "a number <= 2"


def test_the_positive_check_refuses_bools_and_strings_in_every_layer():
    # The two helpers this replaces disagreed: one took True as 1, the other the string "0.5" as 0.5.
    for bad in (True, "0.5"):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0; got temperature="):
            temperature_weights([1, 2], bad)
        with pytest.raises(ValueError, match="radius must be a finite number > 0; got radius="):
            solve_trust_region(np.ones((1, 2)), [0.5, 0.5], radius=bad)
    assert check_positive(2, "x") == 2.0 and isinstance(check_positive(2, "x"), float)
    assert check_unit(1, "c", closed_right=True) == 1.0
    with pytest.raises(ValueError, match=r"c must be a number in \[0, 1\); got c=1"):
        check_unit(1, "c", closed_right=False)
    with pytest.raises(ValueError, match=r"n must be an integer >= 3; got n=2"):
        check_number(2, "n", Range(low=3, integer=True))


@pytest.mark.parametrize("weights, match", [
    ("uniform", "give a mapping domain -> weight"),
    ({}, "give a mapping domain -> weight"),
    ({"": 1.0}, "domain names must be non-empty strings"),
    ({"a": -1}, r"w\['a'\] = -1; weights must be finite and >= 0"),
    ({"a": float("nan")}, r"w\['a'\] = nan"),
    ({"a": True}, r"w\['a'\] = True"),
    ({"a": "0.5"}, r"w\['a'\] = '0.5'"),
    ({"a": 0, "b": 0.0}, "every weight is zero"),
])
def test_a_weight_mapping_is_refused_with_the_entry_named(weights, match):
    with pytest.raises(ValueError, match=match):
        check_weights(weights, "w")


def test_a_weight_mapping_and_a_mixture():
    assert check_weights({"a": 1, "b": 0.5}, "w") == {"a": 1.0, "b": 0.5}
    with pytest.raises(ValueError, match=r"w keys must match domains exactly; missing \['b'\], unknown \['c'\]"):
        check_weights({"a": 1, "c": 1}, "w", ["a", "b"])
    np.testing.assert_array_equal(check_mixture({"b": 0.75, "a": 0.25}, "prior", 2, ["a", "b"]), [0.25, 0.75])
    with pytest.raises(ValueError, match="prior must sum to 1"):
        check_mixture([0.5, 0.6], "prior", 2)
    assert off_simplex([[0.5, 0.5], [0.5, 0.6], [1.0, np.nan], [1 + 1e-7, -1e-7]]).tolist() == [False, True, True,
                                                                                                 False]


def test_an_array_that_is_not_numbers_says_what_was_expected_and_why():
    assert as_float64([[1, 2]], "S").dtype == np.float64
    with pytest.raises(ValueError, match=r"^S must be numbers; could not convert it \(.*'x'"):
        as_float64([["x", 1.0]], "S must be numbers")
    # every layer's conversion goes through it, with its own expectation
    from tikmix_hf.solvers import solve_direct

    with pytest.raises(ValueError, match="S must be a numeric n_tasks x n_domains array; could not convert it"):
        solve_direct([["a", "b"]], [0.5, 0.5])
