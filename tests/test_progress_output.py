"""Progress lines tell the truth: the time left leaves out the engine's start-up, a resume names its round, a long stage shows a bar."""

import re
import time

import pytest

from fedmeta.cli.output import ProgressObserver, console, stage_progress


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.perf_counter``: the test sets ``clock.now``."""

    class Clock:
        now = 0.0

    monkeypatch.setattr(time, "perf_counter", lambda: Clock.now)
    return Clock


def _rounds(observer: ProgressObserver, first: int, rounds: int, ends: list[float], clock) -> list[str]:
    """The lines an observer prints for rounds ``first``, ``first + 1``, ... ending at the clock times ``ends``."""
    with console.capture() as captured:
        clock.now = 0.0
        observer.start(first, rounds)
        for round_, end in enumerate(ends, start=first):
            clock.now = end
            observer.round_done(round_, {"loss": 0.5})
        observer.stop()
    return [line for line in captured.get().splitlines() if line.strip()]


def test_the_first_round_gives_no_eta_and_later_ones_leave_its_start_up_out(clock):
    # Round 1 takes 300 s (Ray starting, workers importing torch) and 10 s of work; rounds 2 and 3 take 10 s each.
    lines = _rounds(ProgressObserver(), 1, 10, [300.0, 310.0, 320.0], clock)
    first, second, third = (next(line for line in lines if line.startswith(f"round {r}/10")) for r in (1, 2, 3))
    assert not re.search(r"ETA \d", first) and "after the next round" in first
    assert second.endswith("ETA 1 min 20 s") and third.endswith("ETA 1 min 10 s")


def test_a_resumed_run_names_the_round_it_continues_from_and_leaves_its_start_up_out(clock):
    lines = _rounds(ProgressObserver(), 11, 20, [700.0, 703.0], clock)
    assert "resuming after round 10 of 20 (its checkpoint): rounds 11-20 to go" in lines
    assert not re.search(r"ETA \d", next(line for line in lines if line.startswith("round 11/20")))
    assert next(line for line in lines if line.startswith("round 12/20")).endswith("ETA 24 s")  # 8 rounds of 3 s


def test_a_fresh_run_says_nothing_about_resuming(clock):
    assert not any("resuming" in line for line in _rounds(ProgressObserver(), 1, 3, [5.0], clock))


def test_a_stage_over_sites_shows_a_bar_counting_them():
    progress = stage_progress()
    with console.capture() as captured:
        seen = list(progress.each(["site_a", "site_b", "site_c"], "personalizing"))
    assert seen == ["site_a", "site_b", "site_c"]
    assert re.search(r"personalizing .*3/3", captured.get()), captured.get()
