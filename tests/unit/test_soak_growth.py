"""The soak's growth figure: medians of the first window after warm-up and of the last window."""

from __future__ import annotations

from bench.soak import growth


def test_flat_series_has_no_growth_and_warmup_is_ignored() -> None:
    samples = [(0.0, 10.0), (5.0, 50.0)] + [(float(t), 100.0) for t in range(10, 100, 5)]
    g = growth(samples, warmup_seconds=10, window_seconds=20, process="worker", measure="rss_mib")
    assert (g.baseline, g.final, g.peak, g.growth, g.ok) == (100.0, 100.0, 100.0, 0.0, True)


def test_a_leak_is_caught() -> None:
    samples = [(float(t), 100.0 + t) for t in range(0, 101, 5)]  # +1 MiB/s
    g = growth(samples, warmup_seconds=20, window_seconds=20, process="api", measure="rss_mib")
    # baseline: median of 120, 125, 130, 135 = 127.5; final: median of 185, 190, 195, 200 = 192.5
    assert g.baseline == 127.5 and g.final == 192.5
    assert g.growth is not None and abs(g.growth - (192.5 / 127.5 - 1)) < 1e-12
    assert not g.ok


def test_no_sample_after_warmup_is_not_ok_and_data_store_memory_is_not_judged() -> None:
    assert not growth([(1.0, 5.0)], warmup_seconds=10, window_seconds=5, process="api", measure="open_fds").ok
    tansu = growth([(float(t), 10.0 + t) for t in range(0, 60, 5)], warmup_seconds=5, window_seconds=10,
                   process="tansu", measure="rss_mib")  # fmt: skip
    assert tansu.growth is not None and tansu.growth > 0.1 and tansu.ok and not tansu.judged
    fds = growth([(float(t), 10.0 + t) for t in range(0, 60, 5)], warmup_seconds=5, window_seconds=10,
                 process="postgres", measure="open_fds")  # fmt: skip
    assert fds.judged and not fds.ok
