"""pace.py: a training run's own speed against its first steps, to tell a user when the machine is
oversubscribed (other jobs on its cores). A step's generation time over its longest response is its
pace (seconds per decoding step, whatever the responses' lengths); the median of the first steps is the
reference. On CPU a compute thread that loses its core stalls its partners at every parallel region,
so a busy machine slows a multi-threaded run far more than the share of the CPU it loses
(--threads 2 beside CPU hogs: 20x slower steps than --threads 1, ONE_THREAD below).
Pure: numbers in, a ratio or None out. Tested by: python -m pytest tests/test_pace.py
"""
import statistics

FIRST, RECENT, FACTOR = 3, 2, 3.0  # reference: steps 2-4 (step 1 warms up); warn at 3x over the last 2
# --threads 1 against 2, stage-1 sandbox steps (2 prompts x 8 rollouts) side by side beside CPU hogs on the 2-core
# machine (load average 13-19): 17.0 / 17.0 / 7.5 s against 393.9 / 376.9 / 127.2 s, the same rollouts (README)
ONE_THREAD = 'about 20x faster per step'


def pace(seconds, longest):
    """Seconds of generation over the decoding steps they took (the longest response, in tokens)."""
    return seconds / max(1, longest)


def slowdown(paces, first=FIRST, recent=RECENT, factor=FACTOR):
    """paces of the steps so far -> how many times slower the last `recent` steps ran than the reference
    (the median of steps 2 .. first + 1), when both are >= factor; else None (also before enough steps)."""
    if len(paces) < 1 + first + recent:
        return None
    ref = statistics.median(paces[1:1 + first])
    ratios = [p / ref for p in paces[-recent:]] if ref > 0 else []
    return min(ratios) if ratios and min(ratios) >= factor else None
