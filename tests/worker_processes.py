"""Real worker processes on 127.0.0.1 for the multi-worker tests: free
ports, an environment that imports the keras_mgda under test, and a
launcher that bounds every wait and kills every process it started."""

import contextlib
import os
import signal
import socket
import subprocess
import time

import keras_mgda

__all__ = ["Job", "free_ports", "worker_env"]


def free_ports(count):
    """`count` distinct TCP ports that are free on 127.0.0.1 now (each
    bound to port 0, all held until every one is known)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


def worker_env(backend, **extra):
    """The environment of a worker: this keras_mgda first on the path, one
    thread per process (the workers share the machine's cores), CPU only,
    collectives on the loopback interface."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(keras_mgda.__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (package_root, tests, os.environ.get("PYTHONPATH")) if p)
    env = dict(
        os.environ,
        PYTHONPATH=path,
        KERAS_BACKEND=backend,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        GLOO_SOCKET_IFNAME="lo",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS="",
    )
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


class Job:
    """Processes started together, their output in files (a full pipe
    would block a worker mid-step). A `with` block kills whatever is still
    running when it ends, however it ends.

    Example:

    ```python
    with Job(tmp_path) as job:
        for rank in range(2):
            job.start([sys.executable, "worker.py", str(rank)], env)
        codes = job.wait(timeout=120)
    ```
    """

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs, self.logs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.kill()

    def start(self, argv, env, cwd=None):
        """Starts `argv` in a process group of its own, so that ending it
        ends whatever it started too (torchrun's workers, a launcher's)."""
        log = os.path.join(self.log_dir, f"process{len(self.procs)}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait(self, timeout, which=None):
        """Waits for the processes numbered `which` (default: all),
        `timeout` seconds in all; returns their exit statuses. Raises
        `TimeoutError` (with every process's output) on time."""
        procs = self.procs if which is None else [self.procs[i] for i in which]
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"still running after {timeout} s:\n{self.output()}") from None
        return [proc.returncode for proc in procs]

    def output(self, index=None, tail=3000):
        """The end of one process's output, or of every process's, labelled."""
        if index is not None:
            with open(self.logs[index], errors="replace") as f:
                return f.read()[-tail:]
        return "\n".join(f"--- process {i} ---\n{self.output(i, tail)}" for i in range(len(self.logs)))

    def kill(self):
        """Ends every process group this job started that still has a
        process (a group outlives its leader when the leader exits first)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

