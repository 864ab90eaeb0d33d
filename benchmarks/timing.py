"""Alternating timer shared by the benchmarks: these machines are noisy, so compared things take turns."""
import time


def time_alternately(runs, rounds):
    """Warm every run up once, then time them in turn for `rounds` rounds: {name: [seconds per round]}.

    A run that returns a float has timed itself (a part of the call, e.g. an epoch after its first batch) and
    that float is recorded instead; any other return value (None, a dict of metrics) times the whole call."""
    for run in runs.values():  # warm-up: allocator, oneDNN primitive caches, worker start-up
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            took = run()
            times[name].append(took if isinstance(took, float) else time.perf_counter() - t0)
    return times
