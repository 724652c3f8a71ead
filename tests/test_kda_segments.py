"""SegmentedKDA's schedule on CUDA, checked on CPU with logging fakes for the streams and the stages (fla's kernels do
not run here; the GPU benchmark checks the fla stages themselves against the reference, segments of 96 tokens)."""
import contextlib

import pytest
import torch

from gendistill.kernels import segments


class Log(list):
    def __call__(self, *event):
        self.append(event)


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other):
        self.log(self.name, "waits for", other.name)

    def record_event(self):
        self.events += 1
        self.log(self.name, f"records event {self.events}")
        return f"{self.name} event {self.events}"

    def wait_event(self, event):
        self.log(self.name, "waits for", event)


class Piece:
    """A tensor stand-in: what a stage made, and which streams it was recorded on."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def record_stream(self, stream):
        self.log(self.name, "recorded on", stream.name)


class FakeStages:
    def __init__(self, log, streams):
        self.log, self.streams = log, streams

    def _on(self):
        return self.streams["current"].name

    def prepare(self, q, k, v, f, b):
        self.log(self._on(), f"prepare {q}")
        return (Piece(f"prepared {q}", self.log),)

    def scan(self, prepared, state):
        segment = prepared[0].name.split()[-1]
        self.log(self._on(), f"scan {segment} from {state.name}")
        return (Piece(f"scanned {segment}", self.log),), Piece(f"state after {segment}", self.log)

    def output(self, scanned):
        segment = scanned[0].name.split()[-1]
        self.log(self._on(), f"output {segment}")
        return f"o {segment}"


@pytest.fixture
def schedule(monkeypatch):
    log = Log()
    main, side = FakeStream("main", log), FakeStream("side", log)
    streams = {"current": main}

    @contextlib.contextmanager
    def on(stream):
        streams["current"] = stream
        try:
            yield
        finally:
            streams["current"] = main

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: streams["current"])
    monkeypatch.setattr(torch.cuda, "stream", on)
    kda = segments.SegmentedKDA(None, None, None, qk_normalized=False, like=torch.zeros(1, 1))
    kda.stages, kda.side, kda.state = FakeStages(log, streams), side, Piece("initial state", log)
    return kda, log


def test_each_scan_runs_on_the_side_stream_beside_the_next_prepare(schedule):
    kda, log = schedule
    done = []
    for s in range(3):
        done += kda.add([s, "k", "v", "f", "b"], tag=f"tag {s}")
    done += kda.finish()
    assert done == [("o 0", "tag 0"), ("o 1", "tag 1"), ("o 2", "tag 2")]  # in order, each with its tag
    assert kda.state.name == "state after 2"
    steps = [e for e in log if "recorded on" not in e]
    assert steps == [
        ("main", "prepare 0"),
        ("side", "waits for", "main"), ("side", "scan 0 from initial state"), ("side", "records event 1"),
        ("main", "prepare 1"),  # issued after scan 0: the two share the GPU
        ("main", "waits for", "side event 1"), ("main", "output 0"),
        ("side", "waits for", "main"), ("side", "scan 1 from state after 0"), ("side", "records event 2"),
        ("main", "prepare 2"),
        ("main", "waits for", "side event 2"), ("main", "output 1"),
        ("main", "scan 2 from state after 1"), ("main", "output 2"),  # the last scan: nothing to run beside
    ]
    # What a scan read is not reused before the side stream is done with it; what it made (the outputs' inputs, the
    # state the main stream's last scan starts from), not before the main stream is.
    recorded = {e[0]: e[2] for e in log if "recorded on" in e}
    assert recorded == {"prepared 0": "side", "prepared 1": "side", "scanned 0": "main", "scanned 1": "main",
                        "state after 0": "main", "state after 1": "main"}


def test_one_segment_runs_on_the_main_stream_alone(schedule):
    kda, log = schedule
    assert kda.add([0, "k", "v", "f", "b"], tag="tag") == []
    assert kda.finish() == [("o 0", "tag")]
    assert log == [("main", "prepare 0"), ("main", "scan 0 from initial state"), ("main", "output 0")]


def test_add_empties_the_inputs_it_takes(schedule):
    kda, _ = schedule
    inputs = [0, "k", "v", "f", "b"]
    kda.add(inputs, tag=None)
    assert inputs == []  # the caller holds no reference: freed once prepared


def test_off_the_gpu_the_stages_run_in_order_on_one_stream():
    kda = segments.SegmentedKDA(None, None, None, qk_normalized=True, like=torch.zeros(1, 1))
    assert kda.side is None and isinstance(kda.stages, segments.WholeStages)
