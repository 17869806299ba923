"""Data-parallel placement: N processes train one model, each on its share of every batch.

A run is distributed when a launcher started it with ``WORLD_SIZE > 1`` in the environment:
``alignlab train NAME --num-processes N`` (``launch`` below, torch's elastic launcher),
``torchrun -m alignlab train ...`` or ``accelerate launch -m alignlab train ...``. ``setup``
(called by ``engine/run.py: prepare_run`` before anything is loaded) joins the process group:
gloo on CPU, nccl on CUDA (one device per local rank).

Semantics, the same for every trainer (``docs/scaling.md``):

- ``train.batch_size`` is the *global* micro-batch: every process takes a contiguous
  ``batch_size / N`` of it, so N processes do what one process does with N micro-batches of
  ``batch_size / N`` accumulated. The loop divides each loss sum by the item count of the whole
  window on *all* ranks (``global_sum``) and ``reduce_gradients`` sums the gradients, so the
  update equals the one-process update up to the order of float sums (tested).
- No ``DistributedDataParallel`` wrapper: the log-prob interface calls sub-modules (the
  backbone, the output embedding in chunks, value heads), which DDP's forward hooks would not
  see. The gradients are summed once per optimizer step instead, in flat buckets; what that
  gives up is overlapping the communication with the backward pass.
- Rank 0 writes (metrics, checkpoints, the final model, caches); every rank reads the same
  checkpoint on resume. Work that must happen once (the reference log-prob cache) runs on rank
  0 first while the others wait (``main_first``); the world build takes a file lock instead.

- ``train.sharding: fsdp`` (or ``accelerate launch`` with an FSDP2 config) shards the model
  instead of replicating it: ``engine/sharding.py``; ``train.sharding: zero1|zero2`` (or an
  accelerate DeepSpeed config) partitions the optimizer state (and gradients) with DeepSpeed
  ZeRO: ``engine/zero.py``. FSDP version 1 and Megatron-LM configs are refused
  (``refuse_sharded_launch``), so is ZeRO stage 3 (``zero.check``).

Every function here is a no-op (or the identity) in a single process and inside ``local()``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from alignlab.core.errors import ConfigError

SHARDED_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED",
               "Megatron-LM": "ACCELERATE_USE_MEGATRON_LM"}
"""What ``accelerate launch`` sets for sharded training. FSDP version 2 is run by
``engine/sharding.py``, DeepSpeed ZeRO-1/2 by ``engine/zero.py``; Megatron-LM is refused."""
BUCKET_BYTES = 64 << 20  # gradients are summed in flat buckets of at most this size
_local_depth = 0  # > 0 inside local(): the code runs as one process


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether collectives are live here (a joined group, not inside ``local()``)."""
    return _local_depth == 0 and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and prints progress."""
    return rank() == 0


def setup(device: str = "auto") -> bool:
    """Join the launcher's process group (once per process); True when distributed.

    CUDA: each process takes ``cuda:LOCAL_RANK`` and nccl; otherwise gloo."""
    if not launched() or _local_depth:
        return False
    refuse_sharded_launch()
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        minutes = float(os.environ.get("ALIGNLAB_DIST_TIMEOUT_MIN", "60"))
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=minutes))
    return active()


def refuse_sharded_launch() -> None:
    """A ConfigError for an accelerate config asking for sharding alignlab does not run (every
    process would otherwise train the whole model while the user believes it sharded)."""
    sharded = [name for name, var in SHARDED_ENV.items()
               if os.environ.get(var, "").lower() in ("true", "1")]
    if not sharded:
        return
    if sharded[0] == "DeepSpeed":
        return  # ZeRO-1/2: engine/zero.py (its stage and settings are checked by zero.check)
    if sharded[0] == "FSDP":
        version = os.environ.get("FSDP_VERSION", "1")
        if version == "2":
            return  # engine/sharding.py
        raise ConfigError(f"accelerate launch: the config asks for FSDP version {version}; "
                          "alignlab shards with FSDP2 only: set fsdp_version: 2 "
                          "(configs/accelerate/fsdp2.yaml)")
    raise ConfigError(f"accelerate launch: the config asks for {sharded[0]}, which alignlab "
                      "does not run (every process would hold the whole model, not a shard); "
                      "use FSDP2 (configs/accelerate/fsdp2.yaml), DeepSpeed ZeRO-2 "
                      "(configs/accelerate/zero2.yaml) or data parallel "
                      "(configs/accelerate/ddp.yaml); docs/scaling.md")


def shutdown() -> None:
    """Leave the process group after every rank arrived (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Run the block as a single process (the world build pretraining on one rank)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it finished (then e.g. find its cache).
    Every rank must reach this point, as with any collective."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def global_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    return global_sum([float(flag)])[0] > 0 if active() else flag


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others (what
    only rank 0 writes, without every rank holding all of it)."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def share(n: int, what: str, field: str) -> slice:
    """This rank's contiguous ``n / N`` of ``n`` items; a ConfigError naming ``field`` when the
    ``n`` items do not split evenly over the processes."""
    size = world_size()
    check_split(n, size, what, field)
    k = n // size
    return slice(rank() * k, (rank() + 1) * k)


def check_split(n: int, processes: int, what: str, field: str) -> None:
    if processes > 1 and n % processes:
        hint = (f"{processes} processes need at least {processes}" if n < processes
                else f"use a multiple of {processes}")
        raise ConfigError(f"field '{field}': {n} {what} cannot be split evenly over {processes} "
                          f"processes (each takes {field}/N); {hint}, or fewer processes")


def reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks, in place. A parameter no rank computed a
    gradient for keeps ``grad = None`` (so AdamW skips it as in one process); one that only some
    ranks touched gets zeros on the others first."""
    if not active():
        return
    from torch.distributed.tensor import DTensor

    # FSDP2's sharded parameters: their gradients were reduce-scattered in backward
    params = [p for p in params if not isinstance(p, DTensor)]
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                         device=_device())
    dist.all_reduce(flags)
    grads = []
    for p, f in zip(params, flags.tolist()):
        if f > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch._utils._flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        for g, summed in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            g.copy_(summed)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Runs of tensors of one dtype and device, each at most ``BUCKET_BYTES`` (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the replicas start identical)."""
    broadcast([*module.parameters(), *module.buffers()])


def broadcast(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place."""
    if not active():
        return
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        data = t.data if t.device == _device() else t.data.to(_device())
        dist.broadcast(data, src=0)
        if data is not t.data:
            t.data.copy_(data)


def whole_batch(fn: Callable[[dict[str, torch.Tensor]], Any], rows: dict[str, torch.Tensor],
                *, offset_keys: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], Any]:
    """Apply ``fn`` to the rows of every rank as one batch; this rank's rows of its outputs.

    ``rows`` holds row-aligned tensors (``[B_r]`` or ``[B_r, T_r]``, right-padded). They are
    gathered in rank order, the second dimension padded with zeros to the longest, and
    ``offset_keys`` (group ids) shifted so no two ranks share an id. ``fn`` returns
    ``(outputs, extra)``: ``outputs`` a dict of row-aligned tensors, of which this rank's rows
    (and its own width) come back, with ``extra`` as ``fn`` returned it (the same on every
    rank). Used where a statistic spans the batch: advantages whitened over all completions.
    Every rank must call it, one with no rows too; when no rank has a row, ``fn`` is not
    called and ``({}, None)`` comes back."""
    if not active():
        return fn(rows)
    parts = gather({k: v.detach().cpu() for k, v in rows.items()})
    counts = [next(iter(p.values())).shape[0] for p in parts]
    if sum(counts) == 0:  # no rank has a row: nothing to compute
        return {}, None
    merged: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        like = next(p[key] for p in parts if key in p)
        if any(key not in p and n for p, n in zip(parts, counts)):
            raise ValueError(f"whole_batch: a rank with rows has no {key!r}")
        # a rank without rows may lack what only rows bring (their log-probs)
        tensors = [p.get(key, like.new_zeros((0, *like.shape[1:]))) for p in parts]
        if key in offset_keys:
            shift, shifted = 0, []
            for t in tensors:
                shifted.append(t + shift)
                shift += int(t.max()) + 1 if t.numel() else 0
            tensors = shifted
        if tensors[0].dim() == 2:
            width = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors]
        merged[key] = torch.cat(tensors)
    outputs, extra = fn(merged)
    start = sum(counts[:rank()])
    mine = slice(start, start + counts[rank()])
    device = next(iter(rows.values())).device
    own = {}
    for key, value in outputs.items():
        value = value[mine]
        if value.dim() == 2:
            width = max((v.shape[1] for v in rows.values() if v.dim() == 2), default=value.shape[1])
            value = value[:, :width]
        own[key] = value.to(device)
    return own, extra


def launch(num_processes: int, argv: Sequence[str]) -> int:
    """Run ``python -m alignlab *argv`` in ``num_processes`` processes on this machine with
    torch's elastic launcher (torchrun ``--standalone``: a free port, no rendezvous server);
    the exit status (0 when every process succeeded)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={num_processes}",
                                         "--module", "alignlab", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        return max(codes) if codes else 1
    return 0


__all__ = ["active", "any_rank", "barrier", "broadcast", "broadcast_module", "check_split", "gather",
           "gather_to_main", "global_sum", "is_main", "launch", "launched", "local", "main_first",
           "reduce_gradients", "rank", "refuse_sharded_launch", "setup", "share", "shutdown", "whole_batch",
           "world_size"]
