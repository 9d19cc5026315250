"""Rollout options as one value: ranges, merging over the fleet's defaults, the engine's plan."""

from __future__ import annotations

import doctest

import pytest
from pydantic import ValidationError

import fleet.rollout_options
from fleet.rollout_options import GateOptions, RolloutOptions
from fleet.rollouts import Gates, Plan


def test_the_module_examples_run():
    assert doctest.testmod(fleet.rollout_options).failed == 0


def test_a_request_changes_only_what_it_names():
    defaults = RolloutOptions(
        stages=[34, 100], soak_s=2, gates=GateOptions(min_sample=4, max_error_rate=None)
    )
    merged = defaults.merged({"max_in_flight": 3, "gates": {"max_crash_rate": None}})
    assert (merged.stages, merged.soak_s, merged.max_in_flight) == ([34.0, 100.0], 2.0, 3)
    assert merged.gates == GateOptions(min_sample=4, max_error_rate=None, max_crash_rate=None)
    assert defaults.merged({}) == defaults


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_sample": 0}, "min_sample"),
        ({"max_crash_rate": 1.5}, "max_crash_rate"),
        ({"max_p95_ratio": 0}, "max_p95_ratio"),
        ({"min_samples": 3}, "min_samples"),
    ],
)
def test_a_bad_gate_is_refused_with_its_field(changes, field):
    with pytest.raises(ValidationError) as refused:
        RolloutOptions().merged({"gates": changes})
    (problem,) = refused.value.errors()
    assert problem["loc"] == ("gates", field)


def test_the_engine_plan_takes_every_option():
    options = RolloutOptions(
        stages=[50, 100],
        soak_s=5,
        max_failure_rate=0.1,
        max_in_flight=7,
        revert_on_fail=False,
        device_timeout_s=60,
        gates=GateOptions(min_sample=2, max_p95_ratio=None, sample_wait_s=30),
    )
    plan = options.engine_plan(
        rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s"
    )
    assert [(s.percent, s.soak_s) for s in plan.stages] == [(50.0, 5.0), (100.0, 5.0)]
    assert (plan.max_in_flight, plan.revert_on_fail, plan.device_timeout_s) == (7, False, 60.0)
    assert plan.gates.min_install_success == pytest.approx(0.9)  # 1 - max_failure_rate
    assert (plan.gates.min_sample, plan.gates.max_p95_ratio, plan.gates.sample_wait_s) == (
        2,
        None,
        30.0,
    )
    explicit = options.merged({"gates": {"min_install_success": 0.5}})
    assert (
        explicit.engine_plan(
            rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s"
        ).gates.min_install_success
        == 0.5
    )
    with pytest.raises(ValueError, match="the last stage must be percent=100"):
        options.merged({"stages": [50, 90]}).engine_plan(
            rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s"
        )


def test_a_requested_failure_tolerance_wins_over_a_success_threshold_in_the_defaults():
    defaults = RolloutOptions(gates=GateOptions(min_install_success=0.99))
    plan = defaults.merged({"max_failure_rate": 0.3}).engine_plan(
        rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s"
    )
    assert plan.gates.min_install_success == pytest.approx(0.7)
    both = defaults.merged({"max_failure_rate": 0.3, "gates": {"min_install_success": 0.8}})
    assert both.gates.min_install_success == 0.8  # named in the same request: it decides
    assert defaults.merged({"soak_s": 1}).gates.min_install_success == 0.99


def test_the_defaults_are_the_engines():
    engine = Gates()
    options = RolloutOptions()
    for name in (
        "min_sample",
        "max_crash_rate",
        "max_error_rate",
        "max_p95_ratio",
        "sample_wait_s",
    ):
        assert getattr(options.gates, name) == getattr(engine, name), name
    assert 1 - options.max_failure_rate == pytest.approx(engine.min_install_success)
    plan = options.engine_plan(
        rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s"
    )
    assert plan.max_in_flight == Plan.__dataclass_fields__["max_in_flight"].default
