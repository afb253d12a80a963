"""Interleaved timing for the end-to-end benchmarks (bench/dit.py, bench/unet.py): every contender is timed once per
round, in an order that rotates from round to round, so a busy or throttling machine slows all of them alike and the
per-round ratios stay comparable; reports give the median with the min-max over rounds."""
import statistics


def interleaved(measure: dict, rounds: int) -> dict:
    """{name: [value per round]} from `measure` {name: () -> float}, called once per round each, order rotated."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(measure)
    values = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            values[name].append(float(measure[name]()))
    return values


def spread(values: list) -> dict:
    "Median, min and max of a list of numbers (and the list)."
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def paired_ratios(values: dict, numerator: str, denominator: str) -> dict:
    "spread() of values[numerator][i] / values[denominator][i]: each round's own ratio, not a ratio of medians."
    return spread([a / b for a, b in zip(values[numerator], values[denominator])])


def fmt(s: dict, digits: int = 2, unit: str = "") -> str:
    "'1.23x [1.10-1.31]' style: median [min-max]."
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"
