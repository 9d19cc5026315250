"""The demo's whole story, run by an operator from the web console (headless Chromium).

``edgefleet demo --rollouts console --json`` runs as a user runs it: its own broker, the fleet
service with the demo's rollout policy as its defaults, twelve virtual devices running the real
agent, and three published releases of cnn. Nothing else starts a rollout: the test does it in
the browser, from the new-rollout form, as the demo's printed steps say. v1 goes to every device
at once, v2 in the default stages and completes, v3 in the default stages and the first stage's
gate halts it and reverts its devices. Ctrl-C (SIGINT) then ends the demo with the summary of the
rollouts that were run. Should the test fail, the fixture stops the demo with SIGINT too, so that
the demo stops its broker and devices itself.

Each page is saved as a screenshot (see :mod:`tests.integration.console_helpers`). Waits are
generous (twelve agents share the machine with the fleet and the browser); nothing asserts how
long a step took.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.integration.conftest import free_port
from tests.integration.console_helpers import chromium, log_in, new_page, shoot, show
from tests.integration.test_demo import start_demo
from tests.polling import wait_until

pytestmark = pytest.mark.integration

ADMIN = "admin-secret-for-the-console-demo"
DEVICES = 12
START_S = 600.0  # building the releases and starting twelve agents on a busy machine
STORY_MS = 600_000  # a rollout's wait in the browser: all its stages, gates and reverts
STOP_S = 180.0
CLEAN_UP_S = 60.0  # a demo that a failed test leaves running stops on SIGINT within this
STEPS = "Run the rollouts in the console"  # printed once a signal ends the wait with the summary


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    url: str
    api: httpx.Client
    stdout: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]

    def ready(self) -> bool:
        """Every device online and the three releases published (fails if the demo ended)."""
        if self.process.poll() is not None:
            pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.log()}")
        try:
            devices = self.api.get("/api/v1/devices").json()
            releases = self.api.get("/api/v1/releases").json()
        except (httpx.HTTPError, ValueError):
            return False  # not serving yet
        if not isinstance(devices, list) or not isinstance(releases, list):
            return False  # e.g. the admin token is not stored yet
        return sum(d["online"] for d in devices) == DEVICES and len(releases) == 3

    def waiting(self) -> bool:
        """The demo has printed its console steps: from then on, SIGINT ends it with the
        summary (fails if the demo ended)."""
        if self.process.poll() is not None:
            pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.log()}")
        return STEPS in self.stderr.read_text(errors="replace")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    port = free_port()
    process, stdout, stderr = start_demo(
        tmp_path,
        *("--rollouts", "console", "--json", "--devices", str(DEVICES)),
        *("--port", str(port), "--work-dir", str(tmp_path / "demo")),
        env={"EDGEFLEET_ADMIN_TOKEN": ADMIN},
    )
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    demo = Demo(process, url, api, stdout, stderr)
    try:
        wait_until(demo.ready, what="12 online devices and 3 releases", timeout=START_S)
        wait_until(demo.waiting, what="the demo's console steps", timeout=START_S)
        yield demo
    finally:
        api.close()
        if process.poll() is None:
            # The demo's own clean-up stops its broker and devices; kill it only if it hangs.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(CLEAN_UP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


def start_rollout(page: Page, url: str, version: str, *, stages: str | None = None) -> str:
    """Start cnn ``version`` from the new-rollout form (the fleet's defaults, but ``stages``),
    after its preview and the confirmation; return the rollout's id."""
    show(page, url, "/rollouts")
    page.get_by_role("link", name="New rollout").click()
    page.get_by_label("Release").select_option(label=f"cnn {version}")
    if stages is not None:
        page.get_by_label("Stages (cumulative %)").fill(stages)
    expect(page.locator("#preview-title")).to_have_text(f"Preview: cnn {version}")
    start = page.locator("#start-rollout")
    expect(start).to_be_enabled()
    shoot(page, f"demo-new-rollout-{version}")
    start.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Start cnn {version}?")
    dialog.get_by_role("button", name="Start rollout").click()
    page.wait_for_url(re.compile(r"#/rollouts/r-[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[1]


def test_an_operator_runs_the_demo_story_from_the_console(demo: Demo, browser: Browser) -> None:
    page = new_page(browser)
    log_in(page, demo.url, ADMIN)
    expect(page.locator(".stat").first).to_contain_text(str(DEVICES))
    shoot(page, "demo-overview-before")

    # The form starts from the fleet's defaults: the demo's policy.
    show(page, demo.url, "/rollouts/new")
    expect(page.get_by_label("Stages (cumulative %)")).to_have_value("34, 100")
    expect(page.get_by_label("Soak per stage (s)")).to_have_value("2")
    expect(page.get_by_label("Install failures at most (%)")).to_have_value("0")
    expect(page.get_by_label("Devices a check needs")).to_have_value(str(DEVICES // 3))
    expect(page.get_by_label("p95 latency ratio at most")).to_have_value("3")
    expect(page.get_by_label("Inference error rate at most (%)")).to_have_value("")
    expect(page.get_by_label("Revert the devices when a gate fails")).to_be_checked()

    # 1. v1 to every device at once; with nothing earlier to compare with, no latency check.
    v1 = start_rollout(page, demo.url, "1.0.0", stages="100")
    state = page.locator("#rollout-state")
    expect(state).to_contain_text("completed", timeout=STORY_MS)
    expect(page.locator("#decisions")).to_contain_text("no earlier version of cnn to compare with")
    shoot(page, "demo-rollout-v1")

    # 2. v2 in the default stages: both gates pass.
    v2 = start_rollout(page, demo.url, "2.0.0")
    expect(page.locator('[data-stage="1"]')).to_be_visible()
    expect(state).to_contain_text("completed", timeout=STORY_MS)
    expect(page.locator("#decisions li")).to_have_count(2)
    shoot(page, "demo-rollout-v2")

    # 3. v3 in the default stages: the first stage's gate halts it and its devices revert.
    v3 = start_rollout(page, demo.url, "3.0.0")
    expect(state).to_contain_text("halted", timeout=STORY_MS)
    expect(page.locator("#decisions li")).to_have_count(1)
    expect(page.locator("#decisions li")).to_contain_text(
        re.compile(r"install success [0-9.]+ < |p95 latency ratio [0-9.]+ > ")
    )
    expect(page.locator("#failure-groups")).to_contain_text("self_test")  # the NPU class
    expect(page.locator('[data-stage="1"]')).to_have_attribute("data-state", "pending")
    shoot(page, "demo-rollout-v3")

    show(page, demo.url, "/")
    versions = page.locator("#model-versions tbody tr")
    expect(versions).to_have_count(1, timeout=STORY_MS)  # every device on one version...
    expect(versions).to_contain_text("2.0.0")  # ...2.0.0 again
    expect(versions).to_contain_text(str(DEVICES))
    shoot(page, "demo-overview-after")
    page.context.close()

    v3_status = demo.api.get(f"/api/v1/rollouts/{v3}").json()
    first_stage = v3_status["stages"][0]["devices"]
    dispatched_later = v3_status["stages"][1]["counts"]
    assert dispatched_later["pending"] == v3_status["stages"][1]["devices"], dispatched_later

    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=STOP_S) == 0, demo.log()
    summary = json.loads(demo.stdout.read_text())
    assert [(r["id"], r["version"], r["state"]) for r in summary["rollouts"]] == [
        (v1, "1.0.0", "completed"),
        (v2, "2.0.0", "completed"),
        (v3, "3.0.0", "halted"),
    ]
    by_version = {r["version"]: r for r in summary["rollouts"]}
    assert by_version["1.0.0"]["devices_updated"] == DEVICES
    bad = by_version["3.0.0"]
    assert bad["stages_reached"] == 1
    assert bad["ever_ran"] <= first_stage  # no device outside the first stage ran it
    assert summary["device_versions"] == {"2.0.0": DEVICES}
    assert "Traceback" not in demo.stderr.read_text()
