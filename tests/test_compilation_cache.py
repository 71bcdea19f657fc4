"""JAX's persistent compilation cache, as docs/benchmarks.md tells users to
switch it on: a second process loads the train step from the cache
instead of compiling it, and trains to the same weights, bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

WORKER = Path(__file__).with_name("cache_worker.py")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's compilation cache"),
]


def _run(tmp_path, cache, name):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / f"{name}.npz"
    result = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_a_second_process_reads_the_train_step_from_the_cache(tmp_path):
    cache = tmp_path / "jax_cache"
    first = _run(tmp_path, cache, "first")
    assert int(first["misses"]) > 0
    assert any(entry.name.startswith("jit_train_step") for entry in cache.iterdir()), "no train step was cached"
    second = _run(tmp_path, cache, "second")
    # Everything the first process compiled, the second loads: no miss.
    assert int(second["misses"]) == 0 and int(second["hits"]) >= int(first["misses"])
    for key in first.files:
        if key.startswith("w"):
            np.testing.assert_array_equal(second[key], first[key], err_msg=key)
