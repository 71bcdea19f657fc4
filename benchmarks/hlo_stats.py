"""What XLA compiled: counts in the optimised HLO text of a compiled JAX
function.

On CPU every fusion is a kernel XLA compiles of its own (through LLVM), and
every reduction or matrix-vector product is a fusion that does not fuse
with its neighbours, so the count of fusions tracks compile time far better
than the count of operations. Used by `step_hlo.py`.
"""

import re
import time

__all__ = ["compile_stats", "hlo_counts"]


def hlo_counts(hlo_text):
    """Fusions, custom calls (LAPACK) and while loops in optimised HLO text.

    Args:
        hlo_text: `compiled.as_text()` of a `jax.stages.Compiled`.

    Returns:
        A dict of the three counts.
    """
    return {
        "fusions": len(re.findall(r"\bfusion\(", hlo_text)),
        "custom_calls": len(re.findall(r"\bcustom-call\(", hlo_text)),
        "while_loops": len(re.findall(r"\bwhile\(", hlo_text)),
    }


def compile_stats(jitted, *args):
    """Lowers and compiles `jitted` (a `jax.jit` function) for `args`.

    Returns:
        A dict with `trace_s` (tracing and lowering), `compile_s` (XLA's
        wall time), `compile_cpu_s` (its CPU time, all threads: steadier
        than wall time on a shared machine), the `hlo_counts` of the
        result and its optimised HLO `text`.
    """
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    cpu = time.process_time()
    compiled = lowered.compile()
    done = time.perf_counter()
    stats = {
        "trace_s": round(traced - start, 3),
        "compile_s": round(done - traced, 3),
        "compile_cpu_s": round(time.process_time() - cpu, 3),
    }
    text = compiled.as_text()
    stats.update(hlo_counts(text), text=text)
    return stats
