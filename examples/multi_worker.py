"""MGDA-UB across processes or machines, on TensorFlow, JAX or PyTorch.

Trains MultiMNIST's LeNet (`keras_mgda.models.multi_mnist_lenet`) with
each engine's own data-parallel training, one process per worker:

- tensorflow: `tf.distribute.MultiWorkerMirroredStrategy` (`TF_CONFIG`);
- jax: `jax.distributed.initialize` and `keras.distribution.DataParallel`;
- torch: `torch.distributed` under `torchrun`.

Every worker solves the same global min-norm problem, so every worker
logs the same task weights at every step; the script prints them per
worker, and the test accuracies at the end.

On this machine (the script starts the workers, on 127.0.0.1):

    python examples/multi_worker.py --engine tensorflow --workers 2
    python examples/multi_worker.py --engine jax --workers 2 --epochs 1 --steps 50
    python examples/multi_worker.py --engine torch --workers 2 --data mnist.npz

On several machines, print the command each host runs:

    python examples/multi_worker.py --engine torch --workers 2 --print-commands --hosts node0,node1

A worker started by hand (or by Slurm, Kubernetes, torchrun) takes
`--worker`: its rank and peers then come from the flags or the engine's
environment (`TF_CONFIG`; `jax.distributed`'s cluster detection;
torchrun's variables). `--backup-dir` adds `BackupAndRestore` (one
directory per worker): start the job again after a failure and it resumes
from the last finished epoch. `--timeout` bounds how long a collective
waits for a peer (docs/multi_device.md says what each engine does).
"""

import argparse
import json
import os
import socket
import subprocess
import sys

ENGINES = ("tensorflow", "jax", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES, default="tensorflow")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes, default 2")
    p.add_argument("--print-commands", action="store_true", help="print each host's command and exit")
    p.add_argument("--hosts", default=None, help="with --print-commands: comma-separated host names")
    p.add_argument("--port", type=int, default=12345, help="with --print-commands: the coordinator's port")
    p.add_argument("--worker", action="store_true", help="run as one worker (see above)")
    p.add_argument("--rank", type=int, default=None, help="with --worker: this worker's index")
    p.add_argument("--addresses", default=None, help="with --worker: every worker's host:port, comma-separated")
    p.add_argument("--data", default=None, help="MNIST .npz (keras.datasets.mnist layout), or 'digits'")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="global batches per epoch (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, default 256")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--test-examples", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backup-dir", default=None, help="BackupAndRestore folder (one sub-folder per worker)")
    p.add_argument("--timeout", type=int, default=None, help="seconds a collective may wait for a peer")
    p.add_argument("--output", default=None, help="folder for each worker's results (default runs/multi_worker-ENGINE)")
    args = p.parse_args(argv)
    args.output = args.output or os.path.join("runs", f"multi_worker-{args.engine}")
    if args.batch_size % args.workers:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --workers {args.workers}")
    return args


def training_flags(args):
    """The flags a worker needs to train as this run does."""
    flags = ["--engine", args.engine, "--workers", str(args.workers), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
             "--output", args.output]
    for name in ("data", "steps", "test_examples", "backup_dir", "timeout"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


# The launcher -----------------------------------------------------------------


def free_ports(count):
    """`count` ports free on 127.0.0.1 (each bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_commands(args):
    """The commands that start every worker on this machine."""
    script = os.path.abspath(__file__)
    flags = training_flags(args)
    if args.engine == "torch":
        port = free_ports(1)[0]
        return [[sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.workers}",
                 "--master-addr=127.0.0.1", f"--master-port={port}", script, "--worker", *flags]]
    addresses = ",".join(f"127.0.0.1:{port}" for port in free_ports(args.workers))
    return [[sys.executable, script, "--worker", "--rank", str(rank), "--addresses", addresses, *flags]
            for rank in range(args.workers)]


def launch(args):
    """Starts the workers here, waits for them, and prints what each saw."""
    os.makedirs(args.output, exist_ok=True)
    env = dict(os.environ, KERAS_BACKEND=args.engine)
    env.pop("TF_CONFIG", None)
    procs = [subprocess.Popen(command, env=env) for command in local_commands(args)]
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:  # on Ctrl-C, or when one fails: end the others
            if proc.poll() is None:
                proc.kill()
    if any(codes):
        raise SystemExit(f"a worker failed (exit statuses {codes})")
    report(args)


def report(args):
    """Prints every worker's per-step task weights and test accuracies."""
    results = []
    for rank in range(args.workers):
        with open(os.path.join(args.output, f"worker{rank}.json")) as f:
            results.append(json.load(f))
    for result in results:
        steps = " ".join("/".join(f"{a:.4f}" for a in step) for step in result["alphas"])
        print(f"worker {result['rank']} task weights (left/right) per step: {steps}")
    first = results[0]
    gap = max(abs(a - b) for r in results for s, t in zip(r["alphas"], first["alphas"]) for a, b in zip(s, t))
    print(f"largest difference between workers' task weights: {gap:.1e}")
    accuracy = ", ".join(f"{task} {100 * value:.2f}%" for task, value in first["accuracy"].items())
    print(f"test accuracy: {accuracy}")


def print_commands(args):
    """Prints the command each host of a cluster runs, one worker per host."""
    hosts = (args.hosts or ",".join(f"host{i}" for i in range(args.workers))).split(",")
    if len(hosts) != args.workers:
        raise SystemExit(f"--hosts names {len(hosts)} hosts for --workers {args.workers}")
    flags = " ".join(training_flags(args))
    script = "examples/multi_worker.py"
    for rank, host in enumerate(hosts):
        if args.engine == "tensorflow":
            config = json.dumps({"cluster": {"worker": [f"{h}:{args.port}" for h in hosts]},
                                 "task": {"type": "worker", "index": rank}})
            command = f"TF_CONFIG='{config}' KERAS_BACKEND=tensorflow python {script} --worker {flags}"
        elif args.engine == "jax":
            command = (f"KERAS_BACKEND=jax python {script} --worker --rank {rank} "
                       f"--addresses {hosts[0]}:{args.port} {flags}")
        else:
            command = (f"KERAS_BACKEND=torch torchrun --nnodes={args.workers} --nproc-per-node=1 "
                       f"--rdzv-id=mgda --rdzv-backend=c10d --rdzv-endpoint={hosts[0]}:{args.port} "
                       f"{script} --worker {flags}")
        print(f"# on {host}\n{command}")


# A worker ---------------------------------------------------------------------


def start_engine(args):
    """Joins the job; returns (rank, world, scope) where `scope()` is the
    context to build the model in."""
    import contextlib

    if args.engine == "tensorflow":
        return _start_tensorflow(args)
    if args.engine == "jax":
        import jax
        import keras

        options = {} if args.timeout is None else {
            "initialization_timeout": args.timeout, "heartbeat_timeout_seconds": args.timeout}
        if args.addresses:  # else: JAX detects the cluster (Slurm, TPU pods, ...)
            options.update(coordinator_address=args.addresses.split(",")[0],
                           num_processes=args.workers, process_id=args.rank)
        jax.distributed.initialize(**options)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        return jax.process_index(), jax.process_count(), contextlib.nullcontext
    import datetime

    import torch
    import torch.distributed as dist

    options = {} if args.timeout is None else {"timeout": datetime.timedelta(seconds=args.timeout)}
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **options)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size(), contextlib.nullcontext


def _start_tensorflow(args):
    if args.addresses:  # else: TF_CONFIG set by the cluster (or by hand)
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": args.addresses.split(",")},
                                              "task": {"type": "worker", "index": args.rank}})
    import tensorflow as tf

    resolver = None  # TF_CONFIG
    if "TF_CONFIG" not in os.environ and "SLURM_PROCID" in os.environ:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=args.timeout)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    resolver = strategy.cluster_resolver
    return resolver.task_id, len(resolver.cluster_spec().as_dict().get("worker", [None])), strategy.scope


def datasets(args, rank, world):
    """Training data and `evaluate`'s arguments: `tf.data` with the global
    batches on TensorFlow and JAX (their engines shard them); on torch
    (which shards nothing) this process's share of each global batch and
    the whole test set, as NumPy arrays, without TensorFlow."""
    sys.path.insert(0, HERE)
    from multi_mnist import choose_source

    source, description = choose_source(args.data)
    print(f"worker {rank}: {description}", flush=True)
    # Whole test batches that split evenly, so that every worker evaluates alike.
    test_batch = min(1000, args.test_examples or 1000) // world * world
    if args.engine == "torch":
        return _torch_datasets(args, source, rank, world, test_batch)
    return _tf_datasets(args, source, test_batch)


def _tf_datasets(args, source, test_batch):
    import tensorflow as tf

    import keras_mgda as km

    train = km.datasets.multi_mnist("train", source=source, seed=args.seed)
    # The same shuffle on every worker (same seed), and whole batches only:
    # every worker must take the same number of steps.
    train = train.shuffle(60000, seed=args.seed).batch(args.batch_size, drop_remainder=True)
    if args.steps is not None:
        train = train.take(args.steps)
    test = km.datasets.multi_mnist("test", source=source, seed=args.seed)
    if args.test_examples is not None:
        test = test.take(args.test_examples)
    test = test.batch(test_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return train.with_options(options), {"x": test.with_options(options)}


def _torch_datasets(args, source, rank, world, test_batch):
    import keras
    import numpy as np

    import keras_mgda as km

    class Share(keras.utils.PyDataset):
        """This process's rows of each global batch, in an order every
        process draws alike (same seed) and draws again each epoch."""

        def __init__(self, x, y, global_batch, steps):
            super().__init__()
            self.x, self.y, self.global_batch, self.epoch = x, y, global_batch, 0
            self.steps = min(steps or len(x), len(x) // global_batch)
            self.order = np.random.default_rng(args.seed).permutation(len(x))

        def __len__(self):
            return self.steps

        def __getitem__(self, index):
            share = self.global_batch // world
            start = index * self.global_batch + rank * share
            rows = self.order[start:start + share]
            return self.x[rows], {task: labels[rows] for task, labels in self.y.items()}

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([args.seed, self.epoch]).permutation(len(self.x))

    x, y = km.datasets.multi_mnist_arrays("train", source=source, seed=args.seed)
    x_test, y_test = km.datasets.multi_mnist_arrays("test", source=source, seed=args.seed)
    count = (args.test_examples or len(x_test)) // test_batch * test_batch
    # Every process evaluates the whole test set (no collective needed).
    test = {"x": x_test[:count], "y": {t: v[:count] for t, v in y_test.items()}, "batch_size": test_batch}
    return Share(x, y, args.batch_size, args.steps), test


def build_model(args):
    import keras

    import keras_mgda as km

    keras.utils.set_random_seed(args.seed)  # the same initial weights on every worker
    model = km.models.multi_mnist_lenet(weighting=km.weighting.MGDA(normalization="none"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(args.lr, momentum=0.9),
        loss={"left": loss, "right": loss},
        metrics={"left": ["accuracy"], "right": ["accuracy"]},
    )
    return model


def step_alphas():
    """A callback collecting each step's task weights (Keras logs their
    running mean over the epoch; the differences give each step's)."""
    import keras

    class StepAlphas(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.alphas = []

        def on_epoch_begin(self, epoch, logs=None):
            self.previous, self.step = None, 0

        def on_train_batch_end(self, batch, logs=None):
            mean = [float(logs["left_alpha"]), float(logs["right_alpha"])]
            self.step += 1
            if self.previous is None:
                self.alphas.append(mean)
            else:
                self.alphas.append([self.step * m - (self.step - 1) * p for m, p in zip(mean, self.previous)])
            self.previous = mean

    return StepAlphas()


def work(args):
    """One worker: joins the job, trains, evaluates, writes its results."""
    import keras

    rank, world, scope = start_engine(args)
    train, test = datasets(args, rank, world)
    with scope():
        model = build_model(args)
    alphas = step_alphas()
    callbacks = [alphas]
    if args.backup_dir:
        callbacks.append(keras.callbacks.BackupAndRestore(os.path.join(args.backup_dir, f"worker{rank}")))
    model.fit(train, epochs=args.epochs, callbacks=callbacks, shuffle=False, verbose=2 if rank == 0 else 0)
    scores = model.evaluate(**test, verbose=0, return_dict=True)
    result = {"rank": rank, "engine": args.engine, "alphas": alphas.alphas,
              "accuracy": {task: float(scores[f"{task}_accuracy"]) for task in ("left", "right")}}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"worker{rank}.json"), "w") as f:
        json.dump(result, f)
    print(f"worker {rank}: last task weights {alphas.alphas[-1]}, test accuracy {result['accuracy']}", flush=True)


def main():
    args = parse()
    if args.print_commands:
        print_commands(args)
    elif args.worker:
        os.environ["KERAS_BACKEND"] = args.engine
        work(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
