"""``--profiles`` and ``--faults`` of ``edgefleet sim run``: what they mean, and clear refusals."""

from __future__ import annotations

import pytest

from shared.errors import UsageError
from simulators.hardware import ModelFault, parse_profiles
from simulators.virtual import DeviceFault, parse_faults


def test_profiles_take_shares_and_a_latency_scale():
    profiles = parse_profiles("x86-cpu=3,arm-npu=1:scale=0.25")
    assert [(p.name, p.weight, p.latency_scale, p.device) for p in profiles] == [
        ("x86-cpu", 3.0, 1.0, "CPU"),
        ("arm-npu", 1.0, 0.25, "NPU"),
    ]
    npu = profiles[1].platform()
    assert not npu.isolate_trials
    assert npu.inventory.cpu.arch == "aarch64"
    assert [a.kind for a in npu.inventory.accelerators] == ["rockchip-npu"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantum-qpu=1", "unknown hardware profile 'quantum-qpu'; expected one of"),
        ("x86-cpu=0", "share of x86-cpu: expected a positive number, got '0'"),
        ("x86-cpu=1:speed=2", "unknown option 'speed' for x86-cpu (expected scale)"),
        ("arm-npu:scale=fast", "scale of arm-npu: expected a positive number, got 'fast'"),
        ("", "no profile given"),
    ],
)
def test_bad_profiles_are_refused_with_what_was_expected(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profiles(spec)


def test_faults_split_into_model_and_device_faults():
    model, device = parse_faults(
        "wrong-output:version=3.0.0:class=arm-npu, slow:version=3.0.0:factor=1.5,"
        "offline:share=0.1:after=20s:for=2m,kill-install:device=sim-00001+sim-00002:point=after_verify,"
        "lost-chunks:share=0.2:rate=0.3,late-enroll:share=0.05:after=1m"
    )
    assert model == [
        ModelFault("3.0.0", "wrong-output", hardware="arm-npu"),
        ModelFault("3.0.0", "slow", factor=1.5),
    ]
    offline, kill, lossy, late = device
    assert (offline.kind, offline.share, offline.after_s, offline.for_s) == (
        "offline",
        0.1,
        20,
        120,
    )
    assert kill.picks("sim-00002")
    assert not kill.picks("sim-00003")
    assert kill.point == "after_verify"
    assert lossy.rate == 0.3
    assert late.after_s == 60


def test_a_share_picks_a_reproducible_part_of_the_fleet():
    fault = DeviceFault("offline", share=0.25)
    ids = [f"sim-{i:05d}" for i in range(4000)]
    picked = [d for d in ids if fault.picks(d)]
    assert picked == [d for d in ids if DeviceFault("offline", share=0.25).picks(d)]
    assert 900 < len(picked) < 1100


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("meteor:share=1", "unknown fault 'meteor'; expected one of"),
        ("slow:factor=2", "which model version"),
        ("offline:after=10s", "which devices"),
        ("offline:share=1.5", "share must be between 0 and 1"),
        ("offline:share=0.1:for=soon", "for expects a duration like 30s or 2m, got 'soon'"),
        ("kill-install:share=1:point=lunch", "point must be one of"),
        ("lost-chunks:share=0.1:rate", "expected key=value, got 'rate'"),
        ("slow:version=2:factor=0.5", "factor must be at least 1"),
        ("offline:share=0.1:colour=red", "unknown option(s) ['colour']"),
    ],
)
def test_bad_faults_are_refused_with_what_was_expected(spec, message):
    with pytest.raises(UsageError) as caught:
        parse_faults(spec)
    assert message in str(caught.value)
