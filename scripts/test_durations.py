"""Where the test suite's time goes: per-test durations from pytest's JUnit
XML report, summed by module and by cause.

Usage:
    KERAS_BACKEND=jax python -m pytest -p no:cacheprovider --junitxml=jax.xml
    python scripts/test_durations.py jax.xml [torch.xml ...]

Each file is one backend's run. A module's cause is what its tests spend
their time on (`CAUSES`); under pytest-xdist the durations are the
workers' summed time, not the wall time.
"""

import argparse
import collections
import re
import xml.etree.ElementTree as ET

# What a module's tests spend their time on (the first pattern that matches).
CAUSES = [
    (r"^tests\.weighting\.", "weighting maths"),
    (r"^tests\.test_solvers$", "solver maths"),
    (r"^tests\.pareto\.test_(minres|hypervolume)$", "Pareto maths"),
    (r"^tests\.pareto\.", "Pareto (Hessian-vector products, walks)"),
    (r"^tests\.test_(datasets|metrics)$", "data and metrics"),
    (r"^tests\.test_(docs|site|method_pages|plots|benchmark_multi_mnist)$", "docs, plots, scripts"),
    (r"^tests\.test_(cross_backend|multi_device|multi_worker|torch_distributed|resume)$", "processes and devices"),
    (r".", "fit: trace/compile and train"),
]


def cause(module):
    return next(label for pattern, label in CAUSES if re.search(pattern, module))


def durations(path):
    """{module: (seconds, tests)} of one JUnit report."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("skipped") is not None:
            continue
        entry = totals[case.get("classname")]
        entry[0] += float(case.get("time", 0.0))
        entry[1] += 1
    return totals


def report(path, top):
    totals = durations(path)
    by_cause = collections.defaultdict(lambda: [0.0, 0])
    for module, (seconds, count) in totals.items():
        by_cause[cause(module)][0] += seconds
        by_cause[cause(module)][1] += count
    seconds = sum(s for s, _ in totals.values())
    print(f"\n{path}: {seconds:.0f} s in {sum(n for _, n in totals.values())} tests")
    print(f"{'cause':44s} {'s':>7s} {'tests':>6s}")
    for label, (s, n) in sorted(by_cause.items(), key=lambda item: -item[1][0]):
        print(f"{label:44s} {s:7.1f} {n:6d}")
    print(f"{'module':44s} {'s':>7s} {'tests':>6s}")
    for module, (s, n) in sorted(totals.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{module:44s} {s:7.1f} {n:6d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="pytest --junitxml files, one per backend")
    parser.add_argument("--top", type=int, default=15, help="modules listed per report")
    args = parser.parse_args()
    for path in args.reports:
        report(path, args.top)


if __name__ == "__main__":
    main()
