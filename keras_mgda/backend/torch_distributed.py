"""What processes training together with `torch.distributed` agree on.

Keras's torch trainer does not synchronise anything across processes. When
a process group with more than one process is initialised, the torch step
does what DistributedDataParallel would do and more, so that `model.fit`
run in every process (each on its shard of the data) trains one model:

- the global problem is the mean over processes of the per-process losses
  (each a mean over its local batch, as Keras computes it; with equal local
  batch sizes this is the loss of the global batch);
- every process solves that same problem: the task losses are averaged
  across processes, and so is the Gram matrix of the global gradients
  (representation mode: the sum of the local Gram matrices divided by R^2,
  since dL/dZ of the global loss is 1/R times the local one on each
  process's rows of Z; parameters mode: the Gram matrix of the per-task
  gradients averaged across processes);
- the gradients are averaged across processes (all-reduce of `.grad`, as
  DDP does) before they are checked and applied.

The models must start from the same weights (broadcast them, or seed the
initialisers identically) and every process must take the same code path.
Whether a step is taken, skipped or raises is decided from all-reduced
values, so all processes agree. Logged losses and metrics are those of the
local process, as with DDP; the logged task weights are global. Do not wrap
the model in DistributedDataParallel for `fit`: the step already averages
the gradients. In `mode="parameters"` the per-task gradients of the shared
weights (T times their size) are all-reduced too, which exact MGDA across
processes cannot avoid.
"""

import torch
import torch.distributed as dist

__all__ = ["all_reduce_mean", "average_gradients", "world_size"]

# Gradients are all-reduced in buckets of at most this many elements.
BUCKET_ELEMENTS = 1 << 22


def world_size():
    """The number of processes training together, or 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tensors, world):
    """Averages detached float tensors across processes with one
    collective; returns new tensors."""
    tensors = [t.detach() for t in tensors]
    if world == 1:
        return tensors
    dtype = tensors[0].dtype
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat / world
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _buckets(grads):
    """The gradients in buckets of one dtype and device, of at most
    `BUCKET_ELEMENTS` elements each."""
    buckets = {}  # (dtype, device) -> list of [size, [tensors]]
    for g in grads:
        if g is None:
            continue
        same_kind = buckets.setdefault((g.dtype, g.device), [])
        if not same_kind or same_kind[-1][0] + g.numel() > BUCKET_ELEMENTS:
            same_kind.append([0, []])
        same_kind[-1][0] += g.numel()
        same_kind[-1][1].append(g)
    return [bucket for same_kind in buckets.values() for _, bucket in same_kind]


def average_gradients(grads, world):
    """Averages the gradients across processes in place (as DDP does)."""
    with torch.no_grad():
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            start = 0
            for g in bucket:
                g.copy_(flat[start:start + g.numel()].view_as(g))
                start += g.numel()
