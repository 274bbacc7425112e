"""The in-memory engine's reader and writer threads keep order, pass errors on and clean up."""

import threading

import numpy as np
import pytest

from poisonguard.core.threads import blas_threads
from poisonguard.engines.overlap import Writer, read_ahead


def test_read_ahead_keeps_order_and_closes_its_source_when_the_consumer_stops():
    closed = threading.Event()

    def source():
        try:
            yield from range(100)
        finally:
            closed.set()

    assert list(read_ahead(source(), depth=3)) == list(range(100))
    taken = []
    for item in read_ahead(source()):
        taken.append(item)
        if item == 4:
            break
    assert taken == [0, 1, 2, 3, 4] and closed.wait(5)
    assert not any(t.name == "poisonguard-read" for t in threading.enumerate())


def test_read_ahead_raises_the_readers_error_in_the_consumer():
    def source():
        yield 1
        raise ValueError("bad row group")

    out = []
    with pytest.raises(ValueError, match="bad row group"):
        for item in read_ahead(source()):
            out.append(item)
    assert out == [1]


def test_writer_calls_the_sink_in_order_and_raises_its_error():
    seen = []
    with Writer(lambda i: seen.append(i), depth=2) as write:
        for i in range(50):
            write(i)
    assert seen == list(range(50))

    def failing(i):
        if i == 3:
            raise OSError("disk full")
        seen.append(i)

    seen.clear()
    with pytest.raises(OSError, match="disk full"):
        with Writer(failing, depth=1) as write:
            for i in range(10):
                write(i)
    assert seen == [0, 1, 2]


def test_the_blas_limit_is_restored_for_the_caller():
    from threadpoolctl import threadpool_info

    def blas():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    before = blas()
    with blas_threads(1):
        assert set(blas()) == {1}
    assert blas() == before


def test_the_memory_engine_fits_and_scores_with_the_configured_blas_threads(monkeypatch):
    import pyarrow as pa
    from threadpoolctl import threadpool_info

    import poisonguard
    import poisonguard.engines.memory as memory

    seen = []
    original = memory.fit_detectors

    def recording(states, config, *confirmed):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return original(states, config, *confirmed)

    monkeypatch.setattr(memory, "fit_detectors", recording)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    table = pa.table({"id": np.arange(400), "label": np.arange(400) % 2,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)})
    for threads in (1, 2):
        poisonguard.screen(table, config={"blas_threads": threads, "detectors": [{"name": "spectral"}]})
    assert seen == [{1}, {2}]
