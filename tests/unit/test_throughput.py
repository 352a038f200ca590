"""The printed and saved tokens/s count only time spent training: evaluations and the loop's
share of checkpoint saves are paused out of both the logging window and the run's rate."""

from __future__ import annotations

from shardtune.train import loop
from shardtune.train.loop import Throughput


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def meter(monkeypatch) -> tuple[Throughput, Clock]:
    clock = Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    meter = Throughput.__new__(Throughput)  # the rate arithmetic only: no model, no collectives
    meter.tokens_per_step, meter.seq_len, meter.peak_flops = 1000, 100, 1e6
    meter.flops_per_position, meter.head_flops_per_target = 100.0, 50.0
    meter.trained_steps = 0
    meter.start()
    return meter, clock


def test_paused_time_is_left_out_of_window_and_overall(monkeypatch):
    m, clock = meter(monkeypatch)
    for _ in range(4):  # 4 steps of 0.5 s, each followed by a 2 s save or evaluation
        clock.now += 0.5
        m.count_step(targets=10)
        with m.paused():
            clock.now += 2.0
    rates = m.window()
    assert rates["tokens_per_s"] == 2000.0
    # 1000 positions x 100 FLOPs + 10 loss targets x 50 head FLOPs, per 0.5 s of training, over 1e6.
    assert rates["mfu"] == (1000 * 100 + 10 * 50) / 0.5 / 1e6
    assert m.overall() == 2000.0
    assert m.wall_seconds() == 10.0


def test_without_pauses_every_second_counts(monkeypatch):
    m, clock = meter(monkeypatch)
    clock.now += 4.0
    m.count_step(targets=0)
    assert m.overall() == 250.0
