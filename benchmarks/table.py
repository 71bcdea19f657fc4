"""Markdown table of `step_time.py --output` results.

One row per (backend, method), one column pair per task count: the method's
ms per step and its ratio to plain Keras measured beside it in the same run.

Usage:
    python benchmarks/table.py out/methods.jsonl
"""

import argparse
import json


def load(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def table(rows):
    task_counts = sorted({r["tasks"] for r in rows})
    keys = []
    cells = {}
    for r in rows:
        key = (r["backend"], r["method"])
        if key not in keys:
            keys.append(key)
        # A repeated measurement replaces the earlier one: the file is
        # appended to, so the last line is the latest run.
        cells[key + (r["tasks"],)] = r
    header = ["backend", "method"]
    for t in task_counts:
        header += [f"T={t} plain ms", f"T={t} ms", f"T={t} ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        row = list(key)
        for t in task_counts:
            r = cells.get(key + (t,))
            if r is None:
                row += ["", "", ""]
            else:
                row += [
                    f"{r['keras_ms_per_step']:.1f}",
                    f"{r[r['method'] + '_ms_per_step']:.1f}",
                    f"{r['ratio']:.3f}",
                ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="JSON-lines files written by step_time.py --output")
    args = parser.parse_args()
    print(table(load(args.paths)))


if __name__ == "__main__":
    main()
