"""The simulated accelerator computes each input once with the real runtime, then replays it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from shared.example_models import write_example
from simulators.hardware import TIMING_RUNS, _SharedSessions


@pytest.fixture(scope="module")
def session_and_inputs(tmp_path_factory: pytest.TempPathFactory):
    model = tmp_path_factory.mktemp("model")
    write_example(model, size="small")
    session = ort.InferenceSession(str(model / "onnx" / "model.onnx"))
    return session, np.load(model / "vectors" / "input.npy")


def test_the_first_device_computes_and_the_next_get_the_same_real_outputs(session_and_inputs):
    session, inputs = session_and_inputs
    sessions = _SharedSessions()
    name = session.get_inputs()[0].name
    first = sessions.run("digest", session, {name: inputs[:1]})
    again = sessions.run("digest", session, {name: inputs[:1].copy()})
    assert again is first  # equal inputs: replayed, not recomputed
    (expected,) = session.run(None, {name: inputs[:1]})
    np.testing.assert_array_equal(first.outputs[0], expected)  # what the runtime computed
    assert first.seconds > 0
    with pytest.raises(ValueError, match="read-only"):
        first.outputs[0][0, 0] = 1.0  # replayed to every device: nobody may change it


def test_other_inputs_and_other_model_files_are_computed_for_themselves(session_and_inputs):
    session, inputs = session_and_inputs
    sessions = _SharedSessions()
    name = session.get_inputs()[0].name
    one = sessions.run("digest", session, {name: inputs[:1]})
    other_input = sessions.run("digest", session, {name: inputs[1:2]})
    other_file = sessions.run("other-digest", session, {name: inputs[:1]})
    assert other_input is not one
    assert not np.array_equal(other_input.outputs[0], one.outputs[0])
    assert other_file is not one


def test_devices_asking_for_a_new_input_at_once_share_one_computation(session_and_inputs):
    session, inputs = session_and_inputs
    runs = []

    class CountingSession:
        def get_outputs(self):
            return session.get_outputs()

        def run(self, names, feeds):
            runs.append(1)
            time.sleep(0.01)  # long enough for the other devices to arrive meanwhile
            return session.run(names, feeds)

    sessions = _SharedSessions()
    name = session.get_inputs()[0].name
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: sessions.run("d", CountingSession(), {name: inputs[:1]}), range(8))
        )
    assert len(runs) == TIMING_RUNS  # one device computed; the seven others waited for it
    assert all(r is results[0] for r in results)


def test_results_outlive_the_session_that_computed_them(session_and_inputs):
    """A self-test's session is closed before serving opens another: nothing is recomputed."""
    session, inputs = session_and_inputs
    sessions = _SharedSessions()
    name = session.get_inputs()[0].name
    first = sessions.run("d", session, {name: inputs[:1]})
    sessions.release("d")
    assert sessions.run("d", session, {name: inputs[:1]}) is first
