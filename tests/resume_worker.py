"""Trains a tiny multi-task model with `keras.callbacks.BackupAndRestore`,
killed with SIGKILL in the middle of an epoch and restarted, beside an
uninterrupted run; writes both final states for `test_resume.py`.

    python tests/resume_worker.py OUT_DIR mgda dwa famo ...

For each weighting: a child process (forked before any computation, so
the backend's threads do not exist yet) trains with the backup and kills
itself with SIGKILL at step `KILL_AT` (in epoch 3); then this process
trains the same model uninterrupted and writes `OUT_DIR/<name>_reference.npz`,
and trains it again from the backup (Keras restores the weights, the
optimizer, BatchNorm, the weighting's state and restarts at the epoch
after the last backup) and writes `OUT_DIR/<name>_resumed.npz`. One
process per backend amortises the imports.
"""

import os
import signal
import sys

import keras
import numpy as np

import keras_mgda as km

EPOCHS = 4
BATCH = 16
SAMPLES = 64  # 4 steps per epoch
KILL_AT = 10  # the third step of epoch 3 (steps counted from 1)


def weighting(name):
    if name in ("pcgrad", "gradvac", "graddrop", "rlw"):
        return km.weighting.by_name()[name](seed=3)
    if name == "stch":
        return km.weighting.STCH(warmup_epochs=2)
    return km.weighting.get(name)


def model_for(name):
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(12, activation="relu", name="trunk")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    z = keras.layers.Dense(8, activation="tanh", name="shared")(h)
    outputs = {"reg": keras.layers.Dense(1, name="reg")(z), "cls": keras.layers.Dense(3, name="cls")(z)}
    model = km.MultiTaskModel(x, outputs, weighting=weighting(name), on_nonfinite="skip")
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss={"reg": "mse", "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
    )
    return model


def dataset():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = {"reg": x[:, :1] * x[:, 1:2], "cls": (x[:, 2] > 0).astype("int32") + (x[:, 3] > 1).astype("int32")}
    x[BATCH + 2, 4] = np.nan  # one bad step per epoch: skipped and counted
    return x, y


class KillAt(keras.callbacks.Callback):
    """SIGKILL at the end of global step `step`: no cleanup, no flush."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(name, backup_dir, kill_at=None):
    model = model_for(name)
    model(dataset()[0][:1])  # BackupAndRestore restores into a built model
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    x, y = dataset()
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    return model, history


def final_state(model, history):
    state = {}
    for prefix, variables in (
        ("model", model.variables),
        ("optimizer", model.optimizer.variables),
        ("weighting", model.weighting.variables),
    ):
        for index, v in enumerate(variables):
            state[f"{prefix}/{index}"] = np.array(keras.ops.convert_to_numpy(v))
    state["skipped_steps"] = np.array(history.history["skipped_steps"][-1])
    state["epochs_run"] = np.array(len(history.history["loss"]))
    return state


def crash(name, out_dir):
    """Forks a child that trains until SIGKILL; returns its exit signal."""
    pid = os.fork()
    if pid == 0:
        try:
            train(name, os.path.join(out_dir, f"{name}_backup"), kill_at=KILL_AT)
        finally:
            os._exit(3)  # not killed: the test sees exit code 3
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def main(out_dir, names):
    killed = {name: crash(name, out_dir) for name in names}
    for name in names:
        reference = final_state(*train(name, os.path.join(out_dir, f"{name}_reference_backup")))
        np.savez(os.path.join(out_dir, f"{name}_reference.npz"), **reference)
        resumed = final_state(*train(name, os.path.join(out_dir, f"{name}_backup")))
        resumed["killed_by"] = np.array(killed[name])
        np.savez(os.path.join(out_dir, f"{name}_resumed.npz"), **resumed)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
