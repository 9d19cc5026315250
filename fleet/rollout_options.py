"""A rollout's options as one value: its stages, pace and gates, as an operator states them.

:class:`RolloutOptions` is what ``POST /api/v1/rollouts`` takes besides the release and the
target, what the console's dry run previews, what :class:`~fleet.rollout_service.RolloutService`
turns into an engine :class:`~fleet.rollouts.Plan` (:meth:`RolloutOptions.engine_plan`), and
the fleet's default policy (``FleetSettings.rollout_defaults``, from the environment
``EDGEFLEET_FLEET_ROLLOUT_DEFAULTS`` as JSON).

A request states only what it changes: :meth:`RolloutOptions.merged` lays the options a request
gives over the fleet's defaults, the gate thresholds one by one, so that
``{"gates": {"min_sample": 2}}`` keeps every other threshold of the defaults.

>>> defaults = RolloutOptions(soak_s=2, gates=GateOptions(min_sample=4, max_error_rate=None))
>>> merged = defaults.merged({"stages": [50, 100], "gates": {"max_p95_ratio": 3}})
>>> merged.stages, merged.soak_s, merged.gates.min_sample, merged.gates.max_p95_ratio
([50.0, 100.0], 2.0, 4, 3.0)
>>> merged.gates.max_error_rate is None  # a threshold of None turns its check off
True

Each field checks its own range here, so a bad value is refused with the field, what it must be
and what arrived; the engine checks what spans fields (the last stage is 100%) when the plan is
built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from fleet.rollouts import Gates, Plan, Stage

__all__ = ["GateOptions", "RolloutOptions"]

Percent = Annotated[float, Field(gt=0, le=100)]


class GateOptions(BaseModel):
    """The thresholds of every stage's gate (:class:`fleet.rollouts.Gates`). ``None`` turns a
    check off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_sample: int = Field(default=5, ge=1, description="devices a check needs")
    max_crash_rate: float | None = Field(
        default=0.05, ge=0, le=1, description="share of devices that fell back on their own"
    )
    max_error_rate: float | None = Field(
        default=0.02, ge=0, le=1, description="inference errors / requests on the new version"
    )
    max_p95_ratio: float | None = Field(
        default=1.25, gt=0, description="p95 latency, new version / the version it replaces"
    )
    min_install_success: float | None = Field(
        default=None, ge=0, le=1, description="None: 1 - max_failure_rate"
    )
    sample_wait_s: float = Field(
        default=300.0, ge=0, description="after the soak, how long telemetry checks wait"
    )


class RolloutOptions(BaseModel):
    """How a rollout goes: stages, pace, gates and what a failed gate does. Units are in the
    field names. The defaults are the engine's (:class:`fleet.rollouts.Gates`; a unit test holds
    them equal), except that a failed gate reverts the devices unless asked otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[Percent] = Field(
        default=[5.0, 25.0, 100.0],
        min_length=1,
        max_length=20,
        description="cumulative share of the target (%) reached by the end of each stage",
    )
    soak_s: float = Field(default=600.0, ge=0, description="wait after each stage's last report")
    max_failure_rate: float = Field(
        default=0.05, ge=0, le=1, description="install failures a stage's gate tolerates"
    )
    max_in_flight: int = Field(default=100, ge=1, description="devices updating at once")
    revert_on_fail: bool = True
    device_timeout_s: float = Field(
        default=3600.0, gt=0, description="no report from a device for this long: it failed"
    )
    gates: GateOptions = GateOptions()

    def merged(self, changes: Mapping[str, Any]) -> RolloutOptions:
        """These options with ``changes`` laid over them; a ``gates`` mapping changes only the
        thresholds it names. A ``max_failure_rate`` in ``changes`` decides the install check
        (``min_install_success`` is then ``1 - max_failure_rate``) unless ``changes`` also names
        ``gates.min_install_success``.

        Raises:
            pydantic.ValidationError: a change with a bad value.
        """
        values = {**self.model_dump(), **changes}
        gates = changes.get("gates", {})
        if isinstance(gates, Mapping):  # anything else is refused by the validation below
            values["gates"] = {**self.gates.model_dump(), **gates}
            if "max_failure_rate" in changes and "min_install_success" not in gates:
                # the tolerance asked for wins over a success threshold from the defaults
                values["gates"]["min_install_success"] = None
        return RolloutOptions.model_validate(values)

    def engine_plan(
        self,
        *,
        rollout_id: str,
        model: str,
        version: str,
        previous_version: str | None,
        salt: str,
    ) -> Plan:
        """The engine's plan of these options for one release.

        Raises:
            ValueError: what the engine refuses across fields (e.g. a last stage below 100%).
        """
        gates = self.gates.model_dump()
        if gates["min_install_success"] is None:
            gates["min_install_success"] = 1 - self.max_failure_rate
        return Plan(
            rollout_id=rollout_id,
            model=model,
            version=version,
            previous_version=previous_version,
            stages=tuple(Stage(percent=p, soak_s=self.soak_s) for p in self.stages),
            salt=salt,
            max_in_flight=self.max_in_flight,
            gates=Gates(**gates),
            revert_on_fail=self.revert_on_fail,
            device_timeout_s=self.device_timeout_s,
        )
