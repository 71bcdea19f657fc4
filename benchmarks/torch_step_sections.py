"""Where the time of one eager torch train step goes, statement by statement.

A diagnostic beside `step_time.py` (which gives the ratios of record): it
times every statement of keras_mgda's torch train step and of Keras's own
torch train step, on the same model and data as `step_time.py`, and prints
the mean milliseconds per step of each statement that costs more than
`--min-ms`. Statements inside `if`/`with`/`for` blocks are timed on their
own; the line of a block covers only its header.

Usage:

    KERAS_BACKEND=torch python benchmarks/torch_step_sections.py --tasks 2
    KERAS_BACKEND=torch python benchmarks/torch_step_sections.py --tasks 40 --method cagrad
    KERAS_BACKEND=torch python benchmarks/torch_step_sections.py --tasks 2 --inside _take_step _gram_step

`--inside NAME ...` also times the statements of these functions of
`keras_mgda.backend.torch`, each called by the one before it (the step
calls the first); a statement's time includes the whole of its calls.
"""

import argparse
import ast
import inspect
import sys
import textwrap
import time

import keras
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from step_time import _compile  # noqa: E402
from step_time import lenet  # noqa: E402
from step_time import make_weighting  # noqa: E402

import keras_mgda as km  # noqa: E402


class _Ticks(ast.NodeTransformer):
    """Puts `_tick(line)` before every statement of a block."""

    def _instrument(self, statements):
        out = []
        for statement in statements:
            self.visit(statement)
            tick = ast.parse(f"_tick({statement.lineno})").body[0]
            out.extend([tick, statement])
        return out

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(node, field, self._instrument(block))
        return node


def instrumented(function, records):
    """A copy of `function` (a plain function or an unbound method) that
    appends `(line, time)` to `records` before each statement, and
    `(None, time)` when it returns; and the source lines by line number."""
    source = textwrap.dedent(inspect.getsource(function))
    tree = ast.parse(source)
    definition = tree.body[0]
    definition.decorator_list = []
    _Ticks().visit(definition)
    ast.fix_missing_locations(tree)
    namespace = dict(function.__globals__)
    namespace["_tick"] = lambda line: records.append((line, time.perf_counter()))
    exec(compile(tree, f"<timed {function.__qualname__}>", "exec"), namespace)
    timed = namespace[definition.name]

    def call(*args, **kwargs):
        try:
            return timed(*args, **kwargs)
        finally:
            records.append((None, time.perf_counter()))

    return call, source.splitlines()


def durations(records):
    """Seconds spent on each line: from its tick to the next record."""
    per_line = {}
    for (line, start), (_, end) in zip(records, records[1:]):
        if line is not None:
            per_line.setdefault(line, []).append(end - start)
    return per_line


def report(title, records, lines, steps, min_ms):
    per_line = durations(records)
    print(f"\n{title}")
    total = 0.0
    for line in sorted(per_line):
        # A line may run several times a step, or not at all.
        ms = 1e3 * sum(per_line[line]) / steps
        total += ms
        if ms >= min_ms:
            print(f"  {ms:8.2f} ms  {lines[line - 1].strip()[:78]}")
    print(f"  {total:8.2f} ms  all statements")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--method", default="mgda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--min-ms", type=float, default=0.05)
    parser.add_argument("--inside", nargs="+", default=[], help="functions of keras_mgda.backend.torch to time too")
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch: this times the eager torch step.")

    from keras.src.backend.torch.trainer import TorchTrainer

    from keras_mgda.backend import torch as torch_step

    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = {f"task_{t}": rng.integers(0, 10, size=(n,)).astype("int32") for t in range(args.tasks)}

    ours_records, plain_records, inner = [], [], {}
    # Innermost first: each copy's globals then hold the timed functions it calls.
    for name in reversed(args.inside):
        records = []
        timed, lines = instrumented(getattr(torch_step, name), records)
        inner[name] = records, lines
        setattr(torch_step, name, timed)
    ours_step, ours_lines = instrumented(torch_step.train_step, ours_records)
    plain_step, plain_lines = instrumented(TorchTrainer.train_step, plain_records)
    plain = lenet(args.tasks)
    ours = lenet(
        args.tasks, km.MultiTaskModel, weighting=make_weighting(args.method, args.tasks)
    )
    for model in (plain, ours):
        _compile(model, args.tasks, "auto")
        model.fit(x[: 2 * args.batch_size], {k: v[: 2 * args.batch_size] for k, v in y.items()},
                  batch_size=args.batch_size, verbose=0)
    torch_step.train_step = ours_step
    TorchTrainer.train_step = plain_step
    for _ in range(args.repeats):
        for model in (plain, ours):
            model.fit(x, y, batch_size=args.batch_size, verbose=0, shuffle=False)
    steps = args.repeats * args.steps
    report(f"keras_mgda torch step, {args.method}, T={args.tasks}", ours_records, ours_lines,
           steps, args.min_ms)
    for name in args.inside:
        report(f"inside {name}", *inner[name], steps, args.min_ms)
    report(f"Keras's own torch step, T={args.tasks}", plain_records, plain_lines, steps, args.min_ms)


if __name__ == "__main__":
    main()
