"""Training across processes with each engine's own distribution API:
TensorFlow's `MultiWorkerMirroredStrategy`, JAX's `jax.distributed` with
`keras.distribution.DataParallel`, and `torch.distributed`.

Real processes on 127.0.0.1 (tests/multi_worker_job.py is the worker):
every worker logs the task weights that one process training on the
global batches logs, at every step, and ends with its weights; a NaN on
one worker's rows is skipped, or raised, by every worker alike; a worker
that dies makes the others fail (no hang), and restarting the job with
`BackupAndRestore` ends where an uninterrupted run ends. Each test runs on
its engine's backend only.

Each job starts three to six engines, a minute or more on two cores, so
they are `slow` except torch's two processes under torchrun: CI runs them
once per backend after the default run (.ci/run). The default run keeps
several devices in one process (test_multi_device.py) on every backend and
two gloo processes (test_torch_distributed.py).
"""

import json
import os
import subprocess
import sys

import keras
import multi_worker_job as job_lib
import numpy as np
import pytest
from worker_processes import Job
from worker_processes import free_ports
from worker_processes import worker_env

BACKEND = keras.backend.backend()
JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_worker_job.py")
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "multi_worker.py")
# A job of a few tiny steps; most of it is starting the engines, slowly on
# a shared 2-core machine.
JOB_TIMEOUT = 300


def _torchrun_rendezvous(port):
    """torchrun's rendezvous options that survive a restart: c10d with its
    store kept apart from the workers' (see `_run_job`) from torch 2.5 on
    (the static rendezvous failed 2 of 3 restarts on torch 2.13); the static
    one before (torch 2.3's c10d rendezvous closes on the first failure:
    RendezvousClosedError)."""
    import torch

    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5):
        return ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    return ["--master-addr=127.0.0.1", f"--master-port={port}"]


def _run_job(tmp_path, world, scenario, *options, torchrun=(), wait=None):
    """Starts `world` workers of `scenario` (under `torchrun` with these
    options when given); returns the exit statuses of the processes waited
    for (`wait`: their indices, default all) and the job (its output)."""
    ports = free_ports(world)
    out = tmp_path / scenario
    out.mkdir(exist_ok=True)
    common = [JOB, BACKEND, scenario, "--world", str(world), "--out", str(out), *options]
    with Job(tmp_path) as job:
        if torchrun:
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                        *_torchrun_rendezvous(ports[0]), *torchrun]
            # A store shared between torchrun's rendezvous and the workers
            # can hand a restarted round the dead round's gloo addresses
            # ("connection refused", pytorch/pytorch#135712).
            env = dict(worker_env(BACKEND), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
            job.start([*launcher, *common], env)
        else:
            for rank in range(world):
                argv = [sys.executable, *common, "--rank", str(rank), "--ports", ",".join(map(str, ports))]
                job.start(argv, worker_env(BACKEND))
        codes = job.wait(JOB_TIMEOUT, wait)
    return codes, job


def _results(tmp_path, scenario, world):
    return [json.loads((tmp_path / scenario / f"rank{rank}.json").read_text()) for rank in range(world)]


def assert_same_training(got, expected, initial, where):
    """The same epochs; every step's task weights to 1e-6; the weights'
    change to 1e-4 of its size (float32 sums in another order)."""
    assert got["epochs"] == expected["epochs"], where
    np.testing.assert_allclose(got["alpha"], expected["alpha"], atol=1e-6, err_msg=where)
    for i, (w, w_ref, w0) in enumerate(zip(got["weights"], expected["weights"], initial, strict=True)):
        change, change_ref = np.subtract(w, w0), np.subtract(w_ref, w0)
        error = np.linalg.norm(change - change_ref) / max(np.linalg.norm(change_ref), 1e-12)
        assert error <= 1e-4, f"{where}, weight {i}: relative error {error:.2e}"


def _expected(reference, result):
    """The reference run as long as `result`'s (some inputs train one epoch)."""
    return reference["one_epoch" if len(result["epochs"]) == 1 else "train"]


def check_train(tmp_path, world, kinds, torchrun=()):
    codes, job = _run_job(tmp_path, world, "train", torchrun=torchrun)
    assert set(codes) == {0}, job.output()
    expected = job_lib.reference(world, "train")
    initial = expected["initial"]
    results = _results(tmp_path, "train", world)
    for rank, result in enumerate(results):
        assert sorted(k for k in result if k not in ("skip", "raise")) == sorted(kinds)
        for kind in kinds:
            assert_same_training(result[kind], _expected(expected, result[kind]), initial, f"{kind}, worker {rank}")
        # A NaN in the last worker's rows: every worker skips the step ...
        assert result["skip"] == {"skipped": 1.0, "iterations": 0, "changed": False}, rank
        # ... or raises naming the task, changes nothing, and trains on.
        message = result["raise"]["message"]
        assert "NaN or Inf" in message and message.endswith(" a"), (rank, message)
        assert result["raise"]["iterations"] == 0
        assert_same_training(result["raise"]["then"], expected["one_step"], initial, f"after raise, worker {rank}")
    # The workers' mean loss is the global batch's (torch logs each
    # process's own, the others the global one).
    for kind in kinds:
        mean = np.mean([result[kind]["loss"] for result in results], axis=0)
        np.testing.assert_allclose(mean, _expected(expected, results[0][kind])["loss"], rtol=1e-5, err_msg=kind)
    # The chief's ModelCheckpoint holds the weights every worker ended with.
    model = job_lib.build()
    model.optimizer.build(model.trainable_variables)
    model.load_weights(tmp_path / "train" / "chief.weights.h5")
    for result in results:
        for w, w_ref in zip(model.get_weights(), result[kinds[0]]["weights"], strict=True):
            np.testing.assert_array_equal(w, np.asarray(w_ref, dtype=w.dtype))


def check_resume(tmp_path, world, message, die_at=(1, 0), options=()):
    """The last worker dies at step `die_at`; the others fail with the
    engine's `message` (they do not wait forever); the restarted job
    resumes from the last backup and ends with the weights of an
    uninterrupted run."""
    die = ["--die-at", ",".join(map(str, die_at))]
    codes, job = _run_job(tmp_path, world, "resume", *die, *options)
    assert codes[-1] == job_lib.DIED, job.output()
    for index in range(world - 1):
        assert codes[index] != 0 and message in job.output(index, tail=100_000), job.output()
    codes, job = _run_job(tmp_path, world, "resume")
    assert codes == [0] * world, job.output()
    check_resumed(tmp_path, world, die_at)


def check_resumed(tmp_path, world, die_at):
    expected = job_lib.reference(world, "resume")["resume"]
    resumed_from = die_at[0]  # the first epoch the death left unfinished
    steps_done = resumed_from * job_lib.STEPS
    for rank, result in enumerate(_results(tmp_path, "resume", world)):
        got = result["resume"]
        assert got["epochs"] == list(range(resumed_from, job_lib.RESUME_EPOCHS)), rank
        np.testing.assert_allclose(got["alpha"], expected["alpha"][steps_done:], atol=1e-6, err_msg=f"worker {rank}")
        for i, (w, w_ref) in enumerate(zip(got["weights"], expected["weights"], strict=True)):
            np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6, err_msg=f"worker {rank}, weight {i}")


def check_example(tmp_path):
    """examples/multi_worker.py starts two workers (torch: through
    torchrun) and each ends with the same task weights at every step and
    the same test accuracies."""
    out = tmp_path / "example"
    argv = [sys.executable, EXAMPLE, "--engine", BACKEND, "--workers", "2", "--data", "digits", "--steps", "2",
            "--batch-size", "32", "--test-examples", "64", "--output", str(out)]
    with Job(tmp_path) as job:
        job.start(argv, worker_env(BACKEND))
        codes = job.wait(JOB_TIMEOUT)
    assert codes == [0], job.output()
    assert "largest difference between workers' task weights: 0.0e+00" in job.output(0, tail=100_000)
    first, second = (json.loads((out / f"worker{rank}.json").read_text()) for rank in range(2))
    assert np.shape(first["alphas"]) == (2, 2)
    np.testing.assert_allclose(np.sum(first["alphas"], axis=1), 1.0, atol=1e-6)  # convex weights
    assert second["alphas"] == first["alphas"] and second["accuracy"] == first["accuracy"]
    assert all(0.0 <= value <= 1.0 for value in first["accuracy"].values())


def check_stuck(tmp_path, world, timeout, message):
    """The last worker never joins; every other one fails with the
    engine's timeout error instead of waiting."""
    codes, job = _run_job(tmp_path, world, "stuck", "--timeout", str(timeout), wait=range(world - 1))
    assert all(code != 0 for code in codes), job.output()
    for index in range(world - 1):
        assert message in job.output(index), job.output()


# TensorFlow -------------------------------------------------------------------

tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="MultiWorkerMirroredStrategy: tensorflow backend")


@tensorflow_only
@pytest.mark.slow
def test_tensorflow_two_workers_match_one_process(tmp_path):
    check_train(tmp_path, 2, ["arrays", "tf.data", "PyDataset"])


@tensorflow_only
@pytest.mark.slow
def test_tensorflow_resume_after_a_worker_dies(tmp_path):
    # The coordination service's heartbeat fails the survivor.
    check_resume(tmp_path, 2, message="UnavailableError")


@tensorflow_only
@pytest.mark.slow
def test_tensorflow_collective_with_a_stuck_worker_times_out(tmp_path):
    check_stuck(tmp_path, 2, timeout=20, message="DeadlineExceeded")


@tensorflow_only
@pytest.mark.slow
def test_tensorflow_example(tmp_path):
    check_example(tmp_path)


@tensorflow_only
@pytest.mark.slow
def test_tensorflow_three_workers_match_one_process(tmp_path):
    check_train(tmp_path, 3, ["arrays", "tf.data", "PyDataset"])


# JAX --------------------------------------------------------------------------

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="jax.distributed: jax backend")


@jax_only
@pytest.mark.slow
def test_jax_two_processes_match_one_process(tmp_path):
    check_train(tmp_path, 2, ["tf.data", "arrays"])


@jax_only
@pytest.mark.slow
def test_jax_example(tmp_path):
    check_example(tmp_path)


@jax_only
@pytest.mark.slow
def test_jax_resume_after_a_process_dies(tmp_path):
    # The coordination service misses the dead process's heartbeats
    # (`heartbeat_timeout_seconds`) and ends the survivor.
    check_resume(tmp_path, 2, message="JAX distributed service detected fatal errors", options=["--timeout", "20"])


# PyTorch ----------------------------------------------------------------------

torch_only = pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed: torch backend")


@torch_only
def test_torchrun_two_processes_match_one_process(tmp_path):
    check_train(tmp_path, 2, ["arrays", "PyDataset"], torchrun=["--max-restarts=0"])


@torch_only
@pytest.mark.slow
def test_torchrun_restarts_after_a_process_dies_and_resumes(tmp_path):
    """torchrun's agent ends the survivors when a process dies and, with
    `--max-restarts`, starts the job again: `BackupAndRestore` resumes it."""
    die_at = (1, 0)
    codes, job = _run_job(tmp_path, 2, "resume", "--die-at", "1,0", torchrun=["--max-restarts=1"])
    assert codes == [0], job.output()
    # The agent saw a process fail: the one that died (exit status DIED) or,
    # reported first, a survivor whose collective it broke.
    assert "failed (exitcode:" in job.output(tail=100_000)
    check_resumed(tmp_path, 2, die_at)


@torch_only
@pytest.mark.slow
def test_torch_resume_after_a_process_dies(tmp_path):
    # Without torchrun's agent: gloo fails the survivor's next collective.
    check_resume(tmp_path, 2, message="by peer")


@torch_only
@pytest.mark.slow
def test_torch_collective_with_a_stuck_process_times_out(tmp_path):
    check_stuck(tmp_path, 2, timeout=10, message="Timed out")


@torch_only
@pytest.mark.slow
def test_torchrun_example(tmp_path):
    check_example(tmp_path)


@torch_only  # plain Python: one backend is enough
def test_example_prints_each_hosts_command():
    def commands(engine):
        argv = [sys.executable, EXAMPLE, "--engine", engine, "--workers", "2", "--print-commands",
                "--hosts", "node0,node1", "--port", "2345"]
        printed = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        return [line for line in printed.splitlines() if not line.startswith("#")]

    for rank, line in enumerate(commands("tensorflow")):
        config = json.loads(line.split("TF_CONFIG='")[1].split("'")[0])
        assert config["cluster"] == {"worker": ["node0:2345", "node1:2345"]}
        assert config["task"] == {"type": "worker", "index": rank}
    for rank, line in enumerate(commands("jax")):
        assert f"--worker --rank {rank} --addresses node0:2345" in line
    torch_lines = commands("torch")
    assert torch_lines[0] == torch_lines[1]  # torchrun's rendezvous assigns the ranks
    assert "torchrun --nnodes=2 --nproc-per-node=1" in torch_lines[0] and "--rdzv-endpoint=node0:2345" in torch_lines[0]
