"""The fake GPU keeps the rules it claims to keep: these are the checks the runtime's CPU tests rely on."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.fakes.cuda import FakeCuda, FakeCudaError


def test_a_replay_reruns_the_record_on_current_contents_with_baked_scalars():
    cuda = FakeCuda()
    x, out = torch.ones(3), torch.zeros(3)
    scale = 2.0
    graph = cuda.new_graph()
    with cuda.capture(graph):
        y = x * scale  # a temporary of the graph
        torch.add(y, 1.0, out=out)
    assert torch.equal(out, torch.zeros(3))  # recorded, not run
    x.fill_(5.0)
    scale = 10.0  # a Python value changed after capture is not seen by the graph
    graph.replay()
    assert torch.equal(out, torch.full((3,), 11.0)) and scale == 10.0


def test_captures_refuse_host_reads_second_captures_and_the_legacy_stream():
    cuda = FakeCuda()
    x = torch.ones(2)
    with pytest.raises(FakeCudaError, match="reads device values"), cuda.capture(cuda.new_graph()):
        x.sum().item()
    with pytest.raises(FakeCudaError, match="legacy default stream"):
        with cuda.capture(cuda.new_graph(), stream=cuda.default):
            pass
    started, release, errors = threading.Event(), threading.Event(), []

    def first():
        with cuda.capture(cuda.new_graph()):
            started.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    started.wait(10)
    try:
        with cuda.capture(cuda.new_graph()):
            pass
    except FakeCudaError as err:
        errors.append(str(err))
    release.set()
    t.join()
    assert errors and "one capture may be underway" in errors[0]
    with pytest.raises(FakeCudaError, match="own inside a CUDA graph capture"), cuda.capture(cuda.new_graph()):
        torch.randn(2, generator=torch.Generator().manual_seed(0))


def test_unordered_streams_sharing_a_resource_are_reported_and_waits_order_them():
    cuda = FakeCuda()
    a, b = cuda.new_stream(None), cuda.new_stream(None)
    cuda.access("scratch", a, a.tick(), "engine A")
    with pytest.raises(FakeCudaError, match="may run at the same time"):
        cuda.access("scratch", b, b.tick(), "engine B")
    b.wait_stream(a)
    cuda.access("scratch", b, b.tick(), "engine B")
    a.synchronize()
    b.synchronize()
    cuda.access("scratch", a, a.tick(), "engine A")  # after the host waited for b, new work on a follows it


def test_work_on_a_stream_outside_the_capture_is_refused_and_forks_must_join():
    cuda = FakeCuda()
    side = cuda.new_stream(None)
    with pytest.raises(FakeCudaError, match="not part of the CUDA graph capture"), cuda.capture(cuda.new_graph()):
        cuda.enqueue(side, lambda stream, stamp: None, "engine")
    with pytest.raises(FakeCudaError, match="not joined back"):
        with cuda.capture(cuda.new_graph()):
            capture_stream = cuda.current_stream(None)
            side.wait_stream(capture_stream)  # fork
            cuda.enqueue(side, lambda stream, stamp: None, "engine")
    graph = cuda.new_graph()
    ran = []
    with cuda.capture(graph):
        capture_stream = cuda.current_stream(None)
        side.wait_stream(capture_stream)
        cuda.enqueue(side, lambda stream, stamp: ran.append(stream), "engine")
        capture_stream.wait_stream(side)  # join
    assert ran == []
    graph.replay()
    assert len(ran) == 1


def test_pool_live_bytes_counts_capture_temporaries_that_outlive_the_capture():
    cuda = FakeCuda()
    pool = cuda.new_pool(None)
    x, out, kept = torch.ones(256), torch.zeros(256), []
    with cuda.capture(cuda.new_graph(), pool=pool):
        torch.mul(x * 2, 3.0, out=out)  # the temporary dies inside the capture
    assert cuda.pool_live_bytes(pool) == 0
    with cuda.capture(cuda.new_graph(), pool=pool):
        kept.append(x * 2)
    assert cuda.pool_live_bytes(pool) == 256 * 4
    kept.clear()
    assert cuda.pool_live_bytes(pool) == 0
