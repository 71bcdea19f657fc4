"""A run killed with SIGKILL in the middle of an epoch and restarted with
`keras.callbacks.BackupAndRestore` ends where an uninterrupted run ends:
the same weights, optimizer slots, BatchNorm statistics, weighting state
and skipped-step count, bit for bit (the tiny model trains on the CPU,
deterministically, on every backend).

Real processes (`resume_worker.py`): one per backend, which forks a child
per weighting that kills itself at step 10 (epoch 3 of 4), then trains
the reference and the resumed run itself. Keras 3.15's BackupAndRestore
restarts at the beginning of the epoch of its last backup (it records the
batch but does not skip to it), so the backups are taken at epoch ends
(`save_freq="epoch"`): a mid-epoch backup would replay that epoch's first
batches on weights that already took them, in any Keras model.

DWA rolls its epoch means over at each epoch's end: the model puts that
hook before the user's callbacks, so the epoch-end backup holds the rolled
state (before, it held the state before the roll-over and a resumed run
differed by 1.0 in the weights).
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

WORKER = Path(__file__).with_name("resume_worker.py")
ROOT = Path(__file__).resolve().parents[1]
EPOCHS, RESUMED_EPOCHS = 4, 2  # the backup of epoch 2's end; epochs 3 and 4 again
# MGDA and DWA (epoch means rolled over by a callback) in the default
# run; the other stateful weightings (a learned logit with its own Adam,
# moving averages, learned weights, gradient estimates, goals and random
# orders, a warm-up) are slow: each costs a fork and four short fits.
DEFAULT = ["mgda", "dwa"]
MORE = ["famo", "dbmtl", "gradnorm", "moco", "gradvac", "stch", "pcgrad"]


def run_worker(tmp_path, names):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["KERAS_BACKEND"] = keras.backend.backend()
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), *names],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def assert_resumed_like_reference(tmp_path, name):
    reference = np.load(tmp_path / f"{name}_reference.npz")
    resumed = np.load(tmp_path / f"{name}_resumed.npz")
    assert int(resumed["killed_by"]) == 9, "the child was not killed by SIGKILL"
    assert int(reference["epochs_run"]) == EPOCHS and int(resumed["epochs_run"]) == RESUMED_EPOCHS
    assert float(resumed["skipped_steps"]) == float(reference["skipped_steps"]) == 1.0
    state = [key for key in reference.files if "/" in key]
    assert any(key.startswith("weighting/") for key in state) or name == "mgda", name
    for key in state:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=f"{name} {key}")


def test_resume_after_sigkill(tmp_path):
    run_worker(tmp_path, DEFAULT)
    for name in DEFAULT:
        assert_resumed_like_reference(tmp_path, name)


@pytest.mark.slow
def test_resume_after_sigkill_more_weightings(tmp_path):
    run_worker(tmp_path, MORE)
    for name in MORE:
        assert_resumed_like_reference(tmp_path, name)
