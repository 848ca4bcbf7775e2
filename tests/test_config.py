"""The options: every ``tikmix_*`` field's declared check, the rules between fields, the flags they make,
and the option groups the mixers bring (tests of what the callback or the CLI does with them live there)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import HfArgumentParser

from tikmix_hf import TiKMiXConfig, TiKMiXTrainingArguments
from tikmix_hf.config import (
    DEFAULT_FRACTIONS,
    DEFAULT_SMOOTHING,
    INFLUENCE_SOURCES,
    INITIAL_KEYWORDS,
    OBJECTIVES,
    SOLVERS,
    validate_config,
    window_obstacle,
)
from tikmix_hf.mixers import (
    MIXERS,
    Decision,
    Mixer,
    ODMOptions,
    StageInputs,
    StaticMixer,
    StaticOptions,
    TiKMiXDirect,
    TiKMiXDOptions,
    TiKMiXMOptions,
    build_mixer,
    register,
)
from tikmix_hf.options import (
    Check,
    OptionGroup,
    choice,
    custom,
    declared_checks,
    fail,
    flag,
    integer,
    number,
    numbers,
    option,
    path,
    text,
)

FIELDS = [f.name for f in dataclasses.fields(TiKMiXConfig)]


def test_the_public_names_are_where_they_were():
    assert SOLVERS == tuple(MIXERS)[: len(SOLVERS)] and OBJECTIVES == ("trust_region", "paper")
    assert INFLUENCE_SOURCES == ("auto", "probes", "training") and "aligned" in INITIAL_KEYWORDS
    assert DEFAULT_FRACTIONS["trust_region"] == (0.05, 0.25, 0.5, 0.75) and DEFAULT_SMOOTHING["paper"] == 0.0
    assert callable(validate_config) and window_obstacle(TiKMiXConfig()) is None


# ============================================================================================
# Bad values: one table, every message names the field, the value and the fix


BAD = [
    # the mixer
    (dict(tikmix_solver="regmix"), r"tikmix_solver='regmix': use one of \('direct', 'surrogate'"),
    (dict(tikmix_initial_weights="heavy"), "tikmix_initial_weights='heavy'"),
    (dict(tikmix_initial_weights='{"a": -1}'), r"tikmix_initial_weights=.*use keep.*\['a'\] = -1"),
    (dict(tikmix_initial_weights='{"a": 0, "b": 0}'), "tikmix_initial_weights=.*every weight is zero"),
    (dict(tikmix_initial_weights='{"a": true}'), "tikmix_initial_weights="),
    (dict(tikmix_initial_weights="aligne"), "tikmix_initial_weights='aligne': use keep, natural, uniform, aligned"),
    (dict(tikmix_alignment_share=1.5), r"tikmix_alignment_share=1.5: must lie in \[0, 1\]"),
    (dict(tikmix_alignment_share=True), "tikmix_alignment_share=True"),
    (dict(tikmix_alignment_sequences=0), "tikmix_alignment_sequences=0: must be a positive integer"),
    (dict(tikmix_seed=-1), "tikmix_seed=-1: must be a non-negative integer"),
    # stages
    (dict(tikmix_stage_steps=0), "tikmix_stage_steps=0"),
    (dict(tikmix_stage_steps=-5), "tikmix_stage_steps=-5"),
    (dict(tikmix_stage_steps=True), "tikmix_stage_steps=True: must be a positive integer"),
    (dict(tikmix_stage_tokens=0), "tikmix_stage_tokens=0"),
    (dict(tikmix_stage_fractions=[0.5, 1.2]), "tikmix_stage_fractions"),
    (dict(tikmix_stage_fractions=[0.5, 0.5]), "tikmix_stage_fractions=.*increasing"),
    (dict(tikmix_stage_fractions="0.5"), "tikmix_stage_fractions='0.5'"),
    (dict(tikmix_stage_steps=5, tikmix_stage_fractions=[0.5]), "only one of"),
    # measurement
    (dict(tikmix_probe_sequences=0), "tikmix_probe_sequences=0"),
    (dict(tikmix_probe_sequences=True), "tikmix_probe_sequences=True"),
    (dict(tikmix_validation_sequences=0), "tikmix_validation_sequences=0"),
    (dict(tikmix_probe_batch_size="x"), r"tikmix_probe_batch_size='x': must be a positive integer \(or unset\)"),
    (dict(tikmix_preconditioner="ekfac2"), "tikmix_preconditioner"),
    (dict(tikmix_damping=float("nan")), "tikmix_damping=nan"),
    (dict(tikmix_influence_source="hooks"), r"tikmix_influence_source='hooks': use one of \('auto', 'probes'"),
    (dict(tikmix_window_steps=0), r"tikmix_window_steps=0: must be a positive number of optimizer steps"),
    (dict(tikmix_window_steps=True), r"tikmix_window_steps=True"),
    (dict(tikmix_window_sequences=-1), "tikmix_window_sequences=-1: must be 0 .every sequence. or a positive number"),
    (dict(tikmix_influence_source="training", tikmix_solver="surrogate"), r"tikmix_solver='direct' only"),
    (dict(tikmix_influence_source="training", tikmix_preconditioner="diag_fisher"), r"diag_fisher is built"),
    (dict(tikmix_influence_source="training", tikmix_target_rse=0.3), r"tikmix_target_rse=0.3: the adaptive"),
    (dict(tikmix_influence_source="training", tikmix_stage_tokens=1000), r"tikmix_stage_steps or tikmix_stage"),
    (dict(tikmix_target_rse=0.0), "tikmix_target_rse"),
    (dict(tikmix_target_rse=0.2, tikmix_solver="surrogate"), "tikmix_target_rse=0.2"),
    (dict(tikmix_target_rse=0.2, tikmix_preconditioner="diag_fisher"), "tikmix_target_rse=0.2"),
    (dict(tikmix_min_probe_batches=1), "tikmix_min_probe_batches"),
    (dict(tikmix_probe_sequences=8, tikmix_probe_max_sequences=8), "tikmix_probe_max_sequences=8: only applies with "
                                                                    "tikmix_target_rse"),
    (dict(tikmix_probe_sequences=8, tikmix_target_rse=0.2, tikmix_probe_max_sequences=4),
     r"tikmix_probe_max_sequences=4: must be an integer >= tikmix_probe_sequences \(8\)"),
    # TiKMiX-D and TiKMiX-M
    (dict(tikmix_objective="fast"), "tikmix_objective=.*use one of"),
    (dict(tikmix_trust_radius=0.0), "tikmix_trust_radius=.*nats > 0"),
    (dict(tikmix_trust_radius_max=float("inf")), "tikmix_trust_radius_max=.*nats > 0"),
    (dict(tikmix_trust_radius=2.0), "tikmix_trust_radius=.*between tikmix_trust_radius_min"),
    (dict(tikmix_max_epochs=-1), "tikmix_max_epochs=.*epochs > 0"),
    (dict(tikmix_gamma=-1.0), "tikmix_gamma=-1.0"),
    (dict(tikmix_alpha=True), "tikmix_alpha=True: must be a finite number >= 0"),
    (dict(tikmix_pareto="no"), "tikmix_pareto='no': must be True or False"),
    (dict(tikmix_floor=1.0), "tikmix_floor=1.0"),
    (dict(tikmix_max_change=0.0), "tikmix_max_change=0.0"),
    (dict(tikmix_max_change=[0.5]), r"tikmix_max_change=\[0.5\]"),
    (dict(tikmix_shrink_z=-1.0), "tikmix_shrink_z"),
    (dict(tikmix_smoothing=1.0), "tikmix_smoothing"),
    (dict(tikmix_surrogate_candidates=2), "tikmix_surrogate_candidates=2"),
    (dict(tikmix_lookahead_sequences=0), r"tikmix_lookahead_sequences=0: must be a positive integer"),
    (dict(tikmix_lookahead_sequences=2.5), r"tikmix_lookahead_sequences=2.5"),
    (dict(tikmix_lookahead_lr=[0.1]), r"tikmix_lookahead_lr=\[0.1\]: must be a positive number"),
    # replay
    (dict(tikmix_solver="replay"), "tikmix_schedule=None: tikmix_solver='replay' needs the path"),
    (dict(tikmix_schedule="s.yaml"), "only used with tikmix_solver='replay'"),
    (dict(tikmix_solver="replay", tikmix_schedule="s.yaml", tikmix_stage_fractions=[0.5]),
     "tikmix_stage_fractions=.*the schedule's positions are the stage boundaries"),
    (dict(tikmix_solver="replay", tikmix_schedule="s.yaml", tikmix_schedule_domains="web=cc"),
     "tikmix_schedule_domains='web=cc': give a JSON mapping"),
    (dict(tikmix_solver="replay", tikmix_schedule=""), "tikmix_schedule='': must be the path"),
    # baselines
    (dict(tikmix_temperature=0.0), "tikmix_temperature=0.0"),
    (dict(tikmix_temperature=float("inf")), "tikmix_temperature=inf"),
    (dict(tikmix_odm_alpha=1.0), "tikmix_odm_alpha=1.0"),
    (dict(tikmix_odm_alpha=-0.1), "tikmix_odm_alpha=-0.1"),
    (dict(tikmix_odm_exploration=0.0), "tikmix_odm_exploration=0.0"),
    (dict(tikmix_odm_exploration=1.5), "tikmix_odm_exploration=1.5"),
    (dict(tikmix_doremi_eta=-1.0), "tikmix_doremi_eta=-1.0"),
    (dict(tikmix_doremi_smoothing=1.5), "tikmix_doremi_smoothing=1.5"),
    (dict(tikmix_doge_eta=0), "tikmix_doge_eta=0"),
    (dict(tikmix_reference_model=""), "tikmix_reference_model='': must be the path of a local folder"),
    # reporting
    (dict(tikmix_entropy_warning=[0.5]), r"tikmix_entropy_warning=\[0.5\]: must lie in \[0, 1\]"),
    (dict(tikmix_show_progress=1), "tikmix_show_progress=1: must be True or False"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[" ".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _ in BAD])
def test_a_bad_value_names_the_field_the_value_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiKMiXConfig(**kwargs)


def test_good_values_construct():
    TiKMiXConfig(tikmix_target_rse=0.2)  # TiKMiX-D with the identity preconditioner takes the adaptive budget
    TiKMiXConfig(tikmix_target_rse=0.2, tikmix_probe_sequences=8, tikmix_probe_max_sequences=8)
    TiKMiXConfig(tikmix_stage_fractions=(0.25, 0.5), tikmix_alpha=2, tikmix_max_epochs=None, tikmix_floor=0.0)
    TiKMiXConfig(tikmix_solver="replay", tikmix_schedule="s.yaml", tikmix_schedule_domains='{"a": "b"}')
    TiKMiXConfig(tikmix_initial_weights='{"code": 0.6, "web": 0}', tikmix_trust_radius=1.0)
    assert TiKMiXConfig(tikmix_initial_weights="aligned").initial_weights() == "aligned"
    assert TiKMiXConfig(tikmix_initial_weights='{"code": 0.6}').initial_weights() == {"code": 0.6}


# ============================================================================================
# Hostile values over every field: a ValueError that names the field, or a config


def _hostile():
    scalars = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats()
               | st.sampled_from([10**400, -(10**400), 1e308, -0.0, 2**63]) | st.text(max_size=6)
               | st.sampled_from(["", "keep", "direct", "replay", "training", "nan", "0.5", "{}", '{"a": 1}', "[1]"]))
    containers = (st.lists(scalars, max_size=4) | st.tuples(scalars, scalars)
                  | st.dictionaries(st.text(max_size=3), scalars, max_size=3) | st.just(object()))
    return scalars | containers


def _builds_or_names(field: str, value) -> None:
    try:
        TiKMiXConfig(**{field: value})
    except ValueError as err:
        assert field in str(err), f"{field}={value!r}: {err}"


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(field=st.sampled_from(FIELDS), value=_hostile())
def test_hostile_values_build_or_raise_a_value_error_naming_the_field(field, value):
    _builds_or_names(field, value)


HOSTILE = [None, True, False, 0, -1, 10**400, -(10**400), float("nan"), float("inf"), -float("inf"), 1e308, "",
           "x", "0.5", [], [0.5], [2.0], [0.7, 0.3], ["a"], (), {}, {"a": 1}, object(), np.float32(0.5), np.int64(3)]


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_under_every_hostile_value(field):
    for value in HOSTILE:
        _builds_or_names(field, value)


# ============================================================================================
# The declarations


def _base_type(hint):
    """``Annotated[X, check]`` -> ``X``; with ``None`` allowed or not."""
    base = typing.get_args(hint)[0]
    args = typing.get_args(base)
    allows_none = type(None) in args
    return (next(a for a in args if a is not type(None)) if allows_none else base), allows_none


def test_every_field_declares_a_check_that_agrees_with_its_type():
    hints = typing.get_type_hints(TiKMiXConfig, include_extras=True)
    checks = declared_checks(TiKMiXConfig)
    assert set(checks) == set(FIELDS)
    kinds = {int: {"integer"}, float: {"number"}, bool: {"flag"}, str: {"text", "path", "custom"}}
    for name in FIELDS:
        base, allows_none = _base_type(hints[name])
        check = checks[name]
        assert check.optional == allows_none, name  # optional exactly where the flag may be unset
        if typing.get_origin(base) is typing.Literal:
            assert check.kind == "choice" and set(typing.get_args(base)) == set(check.options()), name
        elif typing.get_origin(base) is list:
            assert check.kind == "numbers", name
        else:
            assert check.kind in kinds[base], name


def test_every_flag_has_help_and_the_defaults_pass_their_own_checks():
    config = TiKMiXConfig()
    for f in dataclasses.fields(TiKMiXConfig):
        assert f.name.startswith("tikmix_") and f.metadata.get("help"), f.name
        assert set(f.metadata) == {"help"}, f"{f.name}: argparse would be handed {sorted(f.metadata)}"
        declared_checks(TiKMiXConfig)[f.name](f.name, getattr(config, f.name))


def test_the_config_is_composed_of_the_groups_and_each_mixer_reads_its_own():
    fields = set(FIELDS)
    for name, cls in MIXERS.items():
        if cls.options_group is not None:
            assert {f.name for f in dataclasses.fields(cls.options_group)} <= fields, name
    assert MIXERS["direct"].options_group is TiKMiXDOptions and MIXERS["surrogate"].options_group is TiKMiXMOptions
    groups = [b for b in TiKMiXConfig.__mro__ if issubclass(b, OptionGroup) and b not in (OptionGroup, TiKMiXConfig)]
    owned = [name for g in groups for name in g.__dict__.get("__annotations__", {})]
    assert sorted(owned) == sorted(FIELDS)  # each field is declared by exactly one group


# --------------------------------------------------------------------------------------------
# The checks themselves (milliseconds)


@pytest.mark.parametrize("check, good, bad", [
    (number(above=0), [1e-300, 2, 1e308], [0, -1, float("nan"), float("inf"), 10**400, True, "1", None, [1]]),
    (number(at_least=0, below=1), [0, 0.0, 0.999], [1, 1.0, -1e-300, False]),
    (number(above=0, at_most=1), [1, 1e-9], [0, 1.0000001]),
    (number(at_least=0, optional=True), [None, 0], [-0.5]),
    (integer(at_least=1), [1, 10**30], [0, 1.0, True, "1", None, np.int64(3)]),
    (integer(at_least=0, optional=True), [None, 0], [-1, 0.5]),
    (flag(), [True, False], [0, 1, "true", None, np.bool_(True)]),
    (choice(("a", "b")), ["a", "b"], ["c", None, ["a"], 1, np.array(["a", "b"])]),
    (text(), ["x"], ["", None, 1, b"x"]),
    (text(optional=True), [None, "x"], [""]),
    (path(optional=True), [None, "s.yaml"], ["", 3]),
    (numbers(above=0, below=1, optional=True), [None, [0.5], (0.1, 0.2), [0.1, 0.9]],
     [[], [0.5, 0.5], [0.6, 0.3], [0.0], [1.0], [True], ["0.5"], "0.5", 0.5, {0.5: 1}]),
])
def test_a_declared_check_passes_good_values_and_names_the_field_for_bad_ones(check, good, bad):
    for value in good:
        check("tikmix_x", value)
    for value in bad:
        with pytest.raises(ValueError, match=r"^tikmix_x=.*: "):
            check("tikmix_x", value)


def test_the_default_fixes_say_what_to_give():
    assert number(above=0).fix == "must be a finite number > 0"
    assert number(at_least=0, below=1, optional=True).fix == "must be a number in [0, 1) (or unset)"
    assert integer(at_least=1).fix == "must be a positive integer"
    assert integer(at_least=0).fix == "must be a non-negative integer"
    assert integer(at_least=2).fix == "must be an integer >= 2"
    with pytest.raises(ValueError, match=r"tikmix_x='c': use one of \('a', 'b'\)"):
        choice(("a", "b"))("tikmix_x", "c")
    with pytest.raises(TypeError, match="at most one lower bound"):
        number(above=0, at_least=1)


def test_a_choice_from_a_callable_follows_the_registry_as_it_grows():
    names = ["a"]
    check = choice(lambda: tuple(names))
    with pytest.raises(ValueError, match=r"use one of \('a',\)"):
        check("tikmix_x", "b")
    names.append("b")
    check("tikmix_x", "b")


def test_a_custom_check_raises_its_own_message_and_may_allow_none():
    def even(name, value):
        if value % 2:
            fail(name, value, "must be even")

    check = custom(even, optional=True)
    check("tikmix_x", None)
    check("tikmix_x", 4)
    with pytest.raises(ValueError, match="^tikmix_x=3: must be even$"):
        check("tikmix_x", 3)
    assert isinstance(check, Check) and check.kind == "custom"


def test_fail_cuts_a_long_value():
    with pytest.raises(ValueError) as err:
        fail("tikmix_x", 10**400, "too big")
    assert len(str(err.value)) < 160 and str(err.value).endswith("...: too big")


# ============================================================================================
# Groups on their own, and a mixer that brings its own


def test_a_group_checks_itself_and_its_own_rules():
    assert TiKMiXDOptions().smoothing() == DEFAULT_SMOOTHING["trust_region"]
    with pytest.raises(ValueError, match="tikmix_trust_radius=0.5: must lie between"):
        TiKMiXDOptions(tikmix_trust_radius=0.5, tikmix_trust_radius_max=0.2)
    with pytest.raises(ValueError, match="tikmix_temperature=-1"):
        StaticOptions(tikmix_temperature=-1)
    config = TiKMiXConfig(tikmix_temperature=3.0, tikmix_alpha=0.5)
    assert StaticOptions.from_config(config) == StaticOptions(tikmix_temperature=3.0)
    assert TiKMiXMOptions.from_config(config).tikmix_alpha == 0.5
    assert StaticOptions.from_config(object()) == StaticOptions()  # fields a config lacks keep their defaults


def _static_inputs(config, prior=(0.25, 0.75)):
    return StageInputs(stage=0, step=1, domains=["a", "b"], prior=np.array(prior), model=None, optimizer=None,
                       domain_batches={}, validation_batches={}, config=config)


def test_build_mixer_gives_each_mixer_its_own_options():
    config = TiKMiXConfig(tikmix_solver="static", tikmix_temperature=2.0)
    built = build_mixer(config)
    assert isinstance(built, StaticMixer) and built.options == StaticOptions(tikmix_temperature=2.0)
    assert built.decide(_static_inputs(config)).extra == {"temperature": 2.0}
    own = build_mixer(config, options=StaticOptions(tikmix_temperature=4.0))
    assert own.decide(_static_inputs(config)).extra == {"temperature": 4.0}  # its options win over the config's
    bare = StaticMixer()  # built without options: they follow the config it is handed
    assert bare.decide(_static_inputs(TiKMiXConfig(tikmix_temperature=0.5))).extra == {"temperature": 0.5}
    with pytest.raises(ValueError, match="options=ODMOptions.*the StaticMixer mixer takes a StaticOptions"):
        build_mixer(config, options=ODMOptions())
    assert TiKMiXDirect(options=TiKMiXDOptions(tikmix_objective="paper")).configure(config).tikmix_objective == "paper"


@dataclass
class BanditOptions(OptionGroup):
    tikmix_bandit_eta: Annotated[float, number(above=0)] = option(0.5, "bandit: step size of the update.")


@dataclass
class BanditConfig(TiKMiXConfig, BanditOptions):
    """The config of a project that registers its own mixer: TiKMiXConfig plus the mixer's group."""


@pytest.fixture
def bandit():
    @register("bandit_test", options=BanditOptions)
    class BanditMixer(Mixer):
        measures = False

        def decide(self, inputs):
            return Decision(inputs.prior, "converged", f"eta={self.configure(inputs.config).tikmix_bandit_eta}")

    try:
        yield BanditMixer
    finally:
        MIXERS.pop("bandit_test")


def test_a_registered_mixer_brings_its_own_flags(bandit):
    (parsed,) = HfArgumentParser(BanditConfig).parse_args_into_dataclasses(["--tikmix_bandit_eta", "0.25"])
    # --tikmix_solver's argparse choices are those registered when tikmix_hf.config was imported; in code, any
    # registered name is a valid tikmix_solver
    config = dataclasses.replace(parsed, tikmix_solver="bandit_test")
    mixer = build_mixer(config)
    assert isinstance(mixer, bandit) and mixer.options == BanditOptions(tikmix_bandit_eta=0.25)
    assert mixer.decide(_static_inputs(config)).message == "eta=0.25"
    with pytest.raises(ValueError, match="tikmix_bandit_eta=-1.0: must be a finite number > 0"):
        BanditConfig(tikmix_solver="bandit_test", tikmix_bandit_eta=-1.0)
    # without the group among its fields a config still builds the mixer, with the group's defaults
    assert build_mixer(TiKMiXConfig(tikmix_solver="bandit_test")).options == BanditOptions()
    with pytest.raises(TypeError, match="OptionGroup subclass"):
        register("bandit_bad", options=dict)


# ============================================================================================
# The flags: command line, JSON and YAML


def test_every_flag_parses_from_command_line_json_and_yaml(tmp_path):
    argv = [
        "--output_dir", str(tmp_path), "--use_cpu", "--tikmix_solver", "surrogate", "--tikmix_stage_fractions", "0.3",
        "0.6", "--tikmix_warmup_steps", "5", "--tikmix_probe_sequences", "8", "--tikmix_validation_sequences", "4",
        "--tikmix_probe_batch_size", "2", "--tikmix_preconditioner", "adam", "--tikmix_damping", "0.01",
        "--tikmix_alpha", "0.5", "--tikmix_beta", "2", "--tikmix_gamma", "0.1", "--tikmix_pareto", "false",
        "--tikmix_floor", "0.01", "--tikmix_max_change", "0.2", "--tikmix_initial_weights", '{"a": 1}',
        "--tikmix_surrogate_candidates", "32", "--tikmix_lookahead_lr", "0.05", "--tikmix_seed", "7",
        "--tikmix_log_matrix", "false", "--tikmix_entropy_warning", "0.3", "--tikmix_show_progress", "false",
    ]
    (args,) = HfArgumentParser(TiKMiXTrainingArguments).parse_args_into_dataclasses(argv)
    cfg = args.tikmix_config()
    expected = dict(
        tikmix_solver="surrogate", tikmix_stage_fractions=[0.3, 0.6], tikmix_warmup_steps=5,
        tikmix_probe_sequences=8, tikmix_validation_sequences=4, tikmix_probe_batch_size=2,
        tikmix_preconditioner="adam", tikmix_damping=0.01, tikmix_alpha=0.5, tikmix_beta=2.0, tikmix_gamma=0.1,
        tikmix_pareto=False, tikmix_floor=0.01, tikmix_max_change=0.2, tikmix_initial_weights='{"a": 1}',
        tikmix_surrogate_candidates=32, tikmix_lookahead_lr=0.05, tikmix_seed=7, tikmix_log_matrix=False,
        tikmix_entropy_warning=0.3, tikmix_show_progress=False,
    )
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert set(expected) <= set(cfg.to_dict())
    (js,) = HfArgumentParser(TiKMiXConfig).parse_dict({k: v for k, v in expected.items()})
    assert js == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps(expected))
    assert HfArgumentParser(TiKMiXConfig).parse_json_file(str(path))[0] == cfg
    ypath = tmp_path / "c.yaml"
    ypath.write_text(yaml.safe_dump(expected))
    assert HfArgumentParser(TiKMiXConfig).parse_yaml_file(str(ypath))[0] == cfg


def test_baseline_flags_parse_from_the_command_line(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--tikmix_solver", "doremi", "--tikmix_temperature", "3",
            "--tikmix_odm_alpha", "0.5", "--tikmix_odm_exploration", "0.1", "--tikmix_doremi_eta", "0.1",
            "--tikmix_doremi_smoothing", "0.01", "--tikmix_reference_model", str(tmp_path), "--tikmix_doge_eta", "2"]
    (args,) = HfArgumentParser(TiKMiXTrainingArguments).parse_args_into_dataclasses(argv)
    cfg = args.tikmix_config()
    assert (cfg.tikmix_solver, cfg.tikmix_temperature, cfg.tikmix_odm_alpha, cfg.tikmix_odm_exploration,
            cfg.tikmix_doremi_eta, cfg.tikmix_doremi_smoothing, cfg.tikmix_reference_model, cfg.tikmix_doge_eta) == (
        "doremi", 3.0, 0.5, 0.1, 0.1, 0.01, str(tmp_path), 2.0)


def test_replay_flags_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(TiKMiXTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--tikmix_solver", "replay", "--tikmix_schedule", "s.yaml",
        "--tikmix_schedule_domains", '{"cc": "common_crawl"}',
    ])
    config = args.tikmix_config()
    assert (config.tikmix_solver, config.tikmix_schedule) == ("replay", "s.yaml")
    assert config.tikmix_schedule_domains == '{"cc": "common_crawl"}'


def test_training_arguments_are_checked_like_the_config(tmp_path):
    with pytest.raises(ValueError, match="tikmix_alpha=-1.0"):
        HfArgumentParser(TiKMiXTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--tikmix_alpha", "-1"])


def test_smoothing_defaults_to_the_objective_and_a_given_value_wins():
    assert TiKMiXConfig().smoothing() == 0.5  # the default objective accumulates evidence over stages
    assert TiKMiXConfig(tikmix_objective="paper").smoothing() == 0.0  # the paper's: each stage's own S
    assert TiKMiXConfig(tikmix_smoothing=0.0).smoothing() == 0.0
    assert TiKMiXConfig(tikmix_objective="paper", tikmix_smoothing=0.25).smoothing() == 0.25
    (parsed,) = HfArgumentParser(TiKMiXConfig).parse_args_into_dataclasses(["--tikmix_smoothing", "0"])
    assert parsed.tikmix_smoothing == 0.0 and parsed.smoothing() == 0.0
    assert math.isclose(TiKMiXConfig(tikmix_smoothing=0.3).smoothing(), 0.3)
