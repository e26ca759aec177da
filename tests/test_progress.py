"""Plain-log progress lines: count, rate and ETA computed from a controlled clock."""

from __future__ import annotations

import io

from rdn.progress import ProgressReporter, human_bytes, human_seconds


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_report_count_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    with ProgressReporter("data", total=400, unit="files", interval=5.0, stream=out, force_plain=True,
                          clock=clock) as p:
        clock.t += 4.0
        p.advance(40, bytes=2_000_000)   # before the interval: no line yet
        assert out.getvalue() == ""
        clock.t += 6.0                    # 10 s elapsed, 100 files done
        p.advance(60, bytes=3_000_000)
    line = out.getvalue().strip()
    # 100 of 400 files in 10 s -> 10 files/s, 300 left -> 30 s; 5 MB in 10 s -> 500 KB/s
    assert line.startswith("data: 100/400 files (25%)"), line
    assert "5.0 MB (500.0 KB/s)" in line
    assert "10.0 files/s" in line
    assert "elapsed 10.0s" in line
    assert line.endswith("eta 30.0s"), line


def test_unknown_total_has_no_eta_and_terminal_mode_draws_a_bar():
    clock, out = FakeClock(), io.StringIO()
    with ProgressReporter("tok", total=None, unit="chars", interval=0.0, stream=out, force_plain=True,
                          clock=clock) as p:
        clock.t += 2.0
        p.advance(10)
    assert "eta" not in out.getvalue() and "tok: 10 chars" in out.getvalue()
    bar_out = io.StringIO()
    with ProgressReporter("bar", total=10, stream=bar_out, force_plain=False) as p:
        p.advance(10)
    assert "10/10" in bar_out.getvalue()


def test_human_units():
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_500_000) == "1.5 MB"
    assert human_seconds(59.94) == "59.9s"
    assert human_seconds(61) == "1m01s"
    assert human_seconds(3 * 3600 + 120) == "3h02m"
