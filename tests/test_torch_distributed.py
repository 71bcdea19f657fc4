"""PyTorch backend: data-parallel training with torch.distributed.

Two gloo processes (loopback only) each train the same MultiTaskModel on
their half of a global batch; the task weights and the updated weights must
equal those of one process training on the whole batch. The file is also
the worker script: `python test_torch_distributed.py RANK WORLD INIT OUT`.

Also here: the per-task loop that replaces the vectorised backward when an
op has no batching rule.
"""

import datetime
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_mgda as km

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch backend only"
)

WORLD = 2
GLOBAL_BATCH = 16
LEARNING_RATE = 0.1
TASKS = "abc"


class _ScaleDependent(km.weighting.Weighting):
    """Weights 1 / (1 + |g_t|^2): unlike MGDA's, they change when the Gram
    matrix is scaled, so they check its scale, not only its direction."""

    requires_gram = True

    def __init__(self, gradient_space="representation"):
        super().__init__()
        self.gradient_space = gradient_space

    def call(self, losses, gram=None):
        return 1.0 / (1.0 + keras.ops.diagonal(gram))


def _weighting(name):
    return {
        "scale_dependent": _ScaleDependent,
        "scale_dependent_parameters": lambda: _ScaleDependent("parameters"),
        "representation": lambda: km.weighting.MGDA(normalization="loss+"),
        "unnormalized": lambda: km.weighting.MGDA(
            normalization="none", head_update="full"
        ),
        "parameters": lambda: km.weighting.MGDA(
            normalization="loss", mode="parameters"
        ),
        "uniform": km.weighting.Uniform,
    }[name]()


# (weighting, optimizer steps), all run in one process group.
CONFIGS = [
    ("representation", 2),
    ("unnormalized", 1),
    ("parameters", 1),
    ("uniform", 1),
    ("scale_dependent", 1),
    ("scale_dependent_parameters", 1),
]


def _build(weighting_name, on_nonfinite="raise"):
    rng = np.random.default_rng(0)
    x = keras.Input((6,), name="x")
    z = keras.layers.Dense(5, activation="tanh", name="trunk")(x)
    ha = keras.layers.Dense(4, activation="tanh", name="a_hidden")(z)
    a = keras.layers.Dense(1, name="a")(ha)
    b = keras.layers.Dense(3, name="b")(z)
    c = keras.layers.Dense(1, name="c")(z)
    model = km.MultiTaskModel(
        x,
        {"a": a, "b": b, "c": c},
        weighting=_weighting(weighting_name),
        on_nonfinite=on_nonfinite,
    )
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(
                [rng.normal(scale=0.7, size=w.shape) for w in layer.weights]
            )
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss={
            "a": "mse",
            "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "c": keras.losses.BinaryCrossentropy(from_logits=True),
        },
    )
    return model


def _data(step, shard=None, nan=False):
    """The global batch of one step, or its `shard`-th half."""
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(GLOBAL_BATCH, 6)).astype("float32")
    y = {
        "a": rng.normal(size=(GLOBAL_BATCH, 1)).astype("float32"),
        "b": rng.integers(0, 3, size=(GLOBAL_BATCH,)).astype("int32"),
        "c": rng.integers(0, 2, size=(GLOBAL_BATCH, 1)).astype("float32"),
    }
    if nan:
        y["a"][-1] = np.nan  # on the last shard only
    if shard is not None:
        rows = slice(shard * GLOBAL_BATCH // WORLD, (shard + 1) * GLOBAL_BATCH // WORLD)
        x = x[rows]
        y = {k: v[rows] for k, v in y.items()}
    return x, y


def _train(model, steps, shard=None):
    """Returns the logged task weights of each step and the final weights."""
    alphas = []
    for s in range(steps):
        x, y = _data(s, shard)
        logs = model.train_on_batch(x, y, return_dict=True)
        alphas.append([logs[f"{t}_alpha"] for t in TASKS])
    return np.array(alphas), [np.asarray(w) for w in model.get_weights()]


def _worker(rank, world, init_file, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a lone survivor fails
    )
    try:
        results = {}
        for name, steps in CONFIGS:
            alphas, weights = _train(_build(name), steps, shard=rank)
            results[f"{name}/alpha"] = alphas
            for i, w in enumerate(weights):
                results[f"{name}/w{i}"] = w

        # A NaN on one process only: every process skips the step.
        model = _build("representation", on_nonfinite="skip")
        x, y = _data(0, shard=rank, nan=True)
        logs = model.train_on_batch(x, y, return_dict=True)
        results["skip/skipped"] = np.array(logs["skipped_steps"])
        results["skip/iterations"] = np.array(int(model.optimizer.iterations))
        initial = _build("representation").get_weights()
        results["skip/changed"] = np.array(
            any(
                not np.array_equal(a, b)
                for a, b in zip(model.get_weights(), initial, strict=True)
            )
        )

        # ... or every process raises, naming the task.
        model = _build("representation")
        try:
            model.train_on_batch(x, y)
            results["raise/message"] = np.array("")
        except FloatingPointError as error:
            results["raise/message"] = np.array(str(error))
        results["raise/iterations"] = np.array(int(model.optimizer.iterations))

        # Still in step after the failures.
        dist.barrier()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **results)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    # The workers import the keras_mgda this process tests.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(km.__file__)))
    python_path = os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p
    )
    env = dict(
        os.environ,
        PYTHONPATH=python_path,
        KERAS_BACKEND="torch",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    init_file = tmp_path / "init"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD)]
    procs = []
    for rank in range(WORLD):
        # Output goes to files: a full pipe would block a worker mid-step.
        with open(logs[rank], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), str(rank),
                     str(WORLD), str(init_file), str(tmp_path)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    # Meanwhile, the reference: one process, the whole batch.
    expected = {name: _train(_build(name), steps) for name, steps in CONFIGS}
    initial = [np.asarray(w) for w in _build("representation").get_weights()]

    try:
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        output = logs[rank].read_text()[-4000:]
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    got = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(WORLD)]

    for name, _ in CONFIGS:
        alphas, weights = expected[name]
        for rank, result in enumerate(got):
            where = f"{name}, rank {rank}"
            np.testing.assert_allclose(
                result[f"{name}/alpha"], alphas, atol=1e-5, err_msg=where
            )
            for i, (w, w0) in enumerate(zip(weights, initial, strict=True)):
                delta_ref = w - w0
                delta = result[f"{name}/w{i}"] - w0
                scale = max(np.linalg.norm(delta_ref), 1e-12)
                rel = np.linalg.norm(delta - delta_ref) / scale
                assert rel <= 1e-4, f"{where}, weight {i}: relative error {rel:.2e}"

    for result in got:
        assert float(result["skip/skipped"]) == 1.0
        assert int(result["skip/iterations"]) == 0
        assert not bool(result["skip/changed"])
        message = str(result["raise/message"])
        assert "NaN or Inf" in message and message.endswith(" a")
        assert int(result["raise/iterations"]) == 0


def test_loop_fallback_when_batched_backward_fails(monkeypatch):
    """Ops without a vmap batching rule make the batched backward raise; the
    per-task loop must give the same step."""
    import torch

    expected = _train(_build("parameters"), 1)
    real_grad = torch.autograd.grad
    calls = {"batched": 0}

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            raise RuntimeError("no batching rule (simulated)")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    alphas, weights = _train(_build("parameters"), 1)
    assert calls["batched"] == 1  # the encoder (heads: one backward per task)
    np.testing.assert_allclose(alphas, expected[0], atol=1e-6)
    for w, w_ref in zip(weights, expected[1], strict=True):
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
