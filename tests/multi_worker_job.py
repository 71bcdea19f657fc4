"""One process of a data-parallel job, for tests/test_multi_worker.py.

    python tests/multi_worker_job.py ENGINE SCENARIO --rank R --world W --ports P,.. --out DIR

ENGINE is tensorflow (`MultiWorkerMirroredStrategy`, one worker per port
in PORTS), jax (`jax.distributed`, coordinator on the first port,
`keras.distribution.DataParallel`) or torch (`torch.distributed` with
gloo, rendezvous on the first port; under `torchrun` its environment
sets the rank and rendezvous). Each process writes what it saw to
OUT/rank<RANK>.json; the test compares it with `reference`, one process
on the global batches.

Scenarios: `train` (every input kind the engine shards, a checkpoint, the
non-finite paths), `resume` (`BackupAndRestore` with one directory per
worker; with `--die-at EPOCH,BATCH` the last worker dies there, once per
job, and the others must fail rather than wait) and `stuck` (after the
first step the last worker stops joining the collectives; the others must
fail within `--timeout` seconds).
"""

import argparse
import json
import os
import time

import numpy as np

TASKS = "abc"
PER_WORKER_BATCH = 4
STEPS = 2  # per epoch
EPOCHS = 2
RESUME_EPOCHS = 3
LEARNING_RATE = 0.1
# Seconds a collective may wait for a peer before it fails the job.
COLLECTIVE_TIMEOUT = 60
DIED = 17  # the exit status of a worker that `--die-at` ends


def global_data(world, steps=STEPS, nan=False):
    """`steps` global batches of `PER_WORKER_BATCH * world` rows, as one
    array each; with `nan`, one label of task a is NaN in the last row (on
    the last worker's shard)."""
    rows = steps * PER_WORKER_BATCH * world
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, 6)).astype("float32")
    y = {
        "a": rng.normal(size=(rows, 1)).astype("float32"),
        "b": rng.integers(0, 3, size=(rows,)).astype("int32"),
        "c": rng.integers(0, 2, size=(rows, 1)).astype("float32"),
    }
    if nan:
        y["a"][-1] = np.nan
    return x, y


def shard(data, rank, world):
    """Worker `rank`'s rows of every global batch of `data`, in order."""
    x, y = data
    batch = PER_WORKER_BATCH * world
    rows = np.concatenate(
        [np.arange(start + rank * PER_WORKER_BATCH, start + (rank + 1) * PER_WORKER_BATCH)
         for start in range(0, len(x), batch)]
    )
    return x[rows], {k: v[rows] for k, v in y.items()}


def build(on_nonfinite="raise"):
    """A three-task model with fixed initial weights, compiled."""
    import keras

    import keras_mgda as km

    x = keras.Input((6,), name="x")
    z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
    a = keras.layers.Dense(1, name="a")(keras.layers.Dense(4, activation="tanh", name="a_hidden")(z))
    b = keras.layers.Dense(3, name="b")(z)
    c = keras.layers.Dense(1, name="c")(z)
    model = km.MGDAModel(x, {"a": a, "b": b, "c": c}, on_nonfinite=on_nonfinite)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(scale=0.7, size=w.shape).astype("float32") for w in layer.weights])
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
        loss={
            "a": "mse",
            "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "c": keras.losses.BinaryCrossentropy(from_logits=True),
        },
    )
    return model


def _recorder():
    import keras

    class StepLogs(keras.callbacks.Callback):
        """Every step's logged task weights (running means over the epoch,
        as Keras logs them) and the epochs `fit` ran."""

        def __init__(self):
            super().__init__()
            self.alphas, self.losses, self.epochs = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)

        def on_train_batch_end(self, batch, logs=None):
            self.alphas.append([float(logs[f"{t}_alpha"]) for t in TASKS])
            self.losses.append(float(logs["loss"]))

    return StepLogs()


def fit(model, data, epochs=EPOCHS, callbacks=(), batch_size=None):
    """Fits `model` (arrays with `batch_size`, or a dataset); returns the
    logged task weights of every step, the epochs run and the weights."""
    recorder = _recorder()
    kwargs = {} if batch_size is None else {"batch_size": batch_size}
    inputs = data if isinstance(data, tuple) else (data, None)
    model.fit(*inputs, epochs=epochs, shuffle=False, verbose=0, callbacks=[recorder, *callbacks], **kwargs)
    return {
        "alpha": recorder.alphas,
        "loss": recorder.losses,
        "epochs": recorder.epochs,
        "weights": [np.asarray(w).tolist() for w in model.get_weights()],
    }


def reference(world, scenario):
    """What one process training on the global batches logs and ends with."""
    batch = PER_WORKER_BATCH * world
    if scenario == "resume":
        return {"resume": fit(build(), global_data(world), epochs=RESUME_EPOCHS, batch_size=batch)}
    model = build()
    initial = [np.asarray(w).tolist() for w in model.get_weights()]
    return {
        "initial": initial,
        "train": fit(model, global_data(world), batch_size=batch),
        "one_epoch": fit(build(), global_data(world), epochs=1, batch_size=batch),
        "one_step": fit(build(), global_data(world, 1), epochs=1, batch_size=batch),
    }


# Engines ----------------------------------------------------------------------


class TensorFlowEngine:
    """`MultiWorkerMirroredStrategy`, one worker per port; every worker is
    given the global batches and the strategy shards them (by data)."""

    # Keras 3.15 / TF 2.21 under a tf.distribute strategy (Mirrored too,
    # plain keras.Model too): a PyDataset's second epoch trains on
    # something else in some runs, and later models in the process with
    # it. One epoch, after everything else (docs/multi_device.md).
    one_epoch_kinds = ("PyDataset",)

    def __init__(self, rank, world, ports, timeout):
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": rank},
        })
        import tensorflow as tf

        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        assert self.strategy.num_replicas_in_sync == world, self.strategy.num_replicas_in_sync
        self.rank, self.world = rank, world

    def build(self, kind, on_nonfinite="raise"):
        with self.strategy.scope():
            return build(on_nonfinite)

    def inputs(self, data):
        import tensorflow as tf

        batch = PER_WORKER_BATCH * self.world
        return {
            "arrays": (data, batch),
            "tf.data": (tf.data.Dataset.from_tensor_slices(data).batch(batch), None),
            "PyDataset": (py_dataset(data, batch), None),
        }

    def close(self):
        pass


class JaxEngine:
    """`jax.distributed` (gloo CPU collectives), `DataParallel` over every
    process's device: `tf.data` auto-sharded from the global batches, or
    each process's own rows (`auto_shard_dataset=False`)."""

    def __init__(self, rank, world, ports, timeout):
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # JAX 0.10's default
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{ports[0]}",
            num_processes=world,
            process_id=rank,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=timeout,
        )
        assert len(jax.devices()) == world, jax.devices()
        self.rank, self.world = rank, world

    def build(self, kind, on_nonfinite="raise"):
        import jax
        import keras

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=kind == "tf.data")
        )
        keras.utils.set_random_seed(0)  # JAX checks that every process initialises alike
        return build(on_nonfinite)

    def inputs(self, data):
        import tensorflow as tf

        global_batch = PER_WORKER_BATCH * self.world
        return {
            "tf.data": (tf.data.Dataset.from_tensor_slices(data).batch(global_batch), None),
            "arrays": (shard(data, self.rank, self.world), PER_WORKER_BATCH),
        }

    def close(self):
        import jax

        jax.distributed.shutdown()


class TorchEngine:
    """`torch.distributed` with gloo: each process fits on its own rows
    (arrays or a `PyDataset`); under `torchrun` its environment sets the
    rank, world and rendezvous."""

    def __init__(self, rank, world, ports, timeout):
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world, timeout=timeout
            )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def build(self, kind, on_nonfinite="raise"):
        return build(on_nonfinite)

    def inputs(self, data):
        local = shard(data, self.rank, self.world)
        return {"arrays": (local, PER_WORKER_BATCH), "PyDataset": (py_dataset(local, PER_WORKER_BATCH), None)}

    def close(self):
        import torch.distributed as dist

        dist.destroy_process_group()


ENGINES = {"tensorflow": TensorFlowEngine, "jax": JaxEngine, "torch": TorchEngine}


def py_dataset(data, batch):
    """`data` as a `keras.utils.PyDataset` of batches of `batch` rows."""
    import keras

    x, y = data

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(x) // batch

        def __getitem__(self, index):
            rows = slice(index * batch, (index + 1) * batch)
            return x[rows], {k: v[rows] for k, v in y.items()}

    return Batches()


# Scenarios --------------------------------------------------------------------


def train(engine, out):
    """The non-finite paths, then every input kind, the first with a
    `ModelCheckpoint`."""
    import keras

    results = nonfinite(engine)
    for index, (kind, (data, batch_size)) in enumerate(engine.inputs(global_data(engine.world)).items()):
        model = engine.build(kind)
        callbacks = []
        if index == 0:
            # Every worker saves (JAX's saving is collective), the chief to
            # the checkpoint, the others where they do not overwrite it.
            path = os.path.join(out, "chief.weights.h5" if engine.rank == 0 else f"worker{engine.rank}.weights.h5")
            callbacks.append(keras.callbacks.ModelCheckpoint(path, save_weights_only=True))
        epochs = 1 if kind in getattr(engine, "one_epoch_kinds", ()) else EPOCHS
        results[kind] = fit(model, data, epochs=epochs, callbacks=callbacks, batch_size=batch_size)
    return results


def nonfinite(engine):
    """A NaN label on the last worker's rows only: every worker skips the
    step, or every worker raises naming the task, and then trains on."""
    kind, (nan_data, batch_size) = next(iter(engine.inputs(global_data(engine.world, 1, nan=True)).items()))
    model = engine.build(kind, on_nonfinite="skip")
    initial = [np.asarray(w) for w in model.get_weights()]
    history = model.fit(*_xy(nan_data), batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    results = {
        "skip": {
            "skipped": float(history.history["skipped_steps"][-1]),
            "iterations": int(np.asarray(model.optimizer.iterations)),
            "changed": any(not np.array_equal(a, np.asarray(b)) for a, b in zip(initial, model.get_weights())),
        }
    }
    model = engine.build(kind)
    try:
        model.fit(*_xy(nan_data), batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        message = ""
    except FloatingPointError as error:
        message = str(error)
    iterations = int(np.asarray(model.optimizer.iterations))
    _, (data, batch_size) = next(iter(engine.inputs(global_data(engine.world, 1)).items()))
    results["raise"] = {"message": message, "iterations": iterations}
    results["raise"]["then"] = fit(model, data, epochs=1, batch_size=batch_size)
    return results


def _xy(data):
    return data if isinstance(data, tuple) else (data, None)


def resume(engine, backup_root, die_at=None):
    """`RESUME_EPOCHS` epochs with `BackupAndRestore` (one directory per
    worker); with `die_at=(epoch, batch)` the last worker exits there, in
    the job's first run only (`torchrun --max-restarts` runs it again)."""
    import keras

    kind, (data, batch_size) = next(iter(engine.inputs(global_data(engine.world)).items()))
    model = engine.build(kind)
    callbacks = [keras.callbacks.BackupAndRestore(os.path.join(backup_root, f"worker{engine.rank}"))]
    first_run = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if die_at is not None and first_run and engine.rank == engine.world - 1:
        callbacks.append(_Die(*die_at))
    return {"resume": fit(model, data, epochs=RESUME_EPOCHS, callbacks=callbacks, batch_size=batch_size)}


def _Die(epoch, batch):
    return _At(epoch, batch, lambda: os._exit(DIED))


def _At(epoch, batch, action):
    import keras

    class At(keras.callbacks.Callback):
        """Runs `action` after step `batch` of epoch `epoch`."""

        def on_epoch_begin(self, current, logs=None):
            self.epoch = current

        def on_train_batch_end(self, current, logs=None):
            if (self.epoch, current) == (epoch, batch):
                action()

    return At()


def stuck(engine):
    """After the first step (every variable exists, so nothing is left but
    the steps' own collectives) the last worker sleeps (the test kills
    it); the others wait for it in the second step, and must fail."""
    kind, (data, batch_size) = next(iter(engine.inputs(global_data(engine.world)).items()))
    model = engine.build(kind)
    callbacks = [_At(0, 0, lambda: time.sleep(3600))] if engine.rank == engine.world - 1 else []
    fit(model, data, epochs=1, callbacks=callbacks, batch_size=batch_size)
    return {}


def main(args):
    engine = ENGINES[args.engine](args.rank, args.world, args.ports.split(","), args.timeout)
    try:
        if args.scenario == "train":
            results = train(engine, args.out)
        elif args.scenario == "resume":
            results = resume(engine, os.path.join(args.out, "backup"), args.die_at)
        else:
            results = stuck(engine)
        with open(os.path.join(args.out, f"rank{engine.rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        engine.close()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", choices=sorted(ENGINES))
    p.add_argument("scenario", choices=["train", "resume", "stuck"])
    p.add_argument("--rank", type=int, default=0, help="ignored under torchrun")
    p.add_argument("--world", type=int, default=1, help="ignored under torchrun")
    p.add_argument("--ports", default="", help="comma-separated; torch and JAX use the first")
    p.add_argument("--out", required=True)
    p.add_argument("--die-at", type=lambda v: tuple(int(i) for i in v.split(",")), default=None)
    p.add_argument("--timeout", type=int, default=COLLECTIVE_TIMEOUT, help="seconds a collective may wait")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse())
