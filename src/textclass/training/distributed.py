"""The one place that knows about ranks: training under torchrun (DDP), one process per device.

`torchrun --nproc_per_node N -m textclass train ...` (or `textclass train --nproc N`, which starts torchrun
through `launch`, or `accelerate launch --multi_gpu --num_processes N -m textclass train ...`, which runs
torchrun underneath, on CPU too) runs the same program N times, numbered by torchrun's environment
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT). The Trainer shards the batches and all-reduces the
gradients (DDP); everything around it follows one rule here: rank 0 does what happens once (read and
split the data, write the tokenization cache, the run directory, reports, logs), the other ranks wait
for it or take its result, and no file is ever written by two ranks.

The process group is started from torchrun's environment by accelerate's `PartialState` (the object the
Trainer's `TrainingArguments` start it with: backend gloo on CPU, nccl on CUDA), early, because data and
the run directory are handled before the Trainer exists; `TrainingArguments` then reuses the group.
Helpers here are no-ops in a plain single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from textclass.errors import UserError
from textclass.training.optim import sparse_parameters

log = logging.getLogger("textclass")
T = TypeVar("T")
# The Trainer's own default (`TrainingArguments.ddp_timeout`): how long a rank waits in a collective, e.g.
# for rank 0 writing the reports of one k-fold fold before the next fold trains.
TIMEOUT = timedelta(seconds=1800)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# The world sizes MPI launchers give each process (Intel MPI/MPICH and Slurm's PMI, Open MPI, MVAPICH): the
# variables accelerate's own CPU launch (`accelerate launch --cpu` with mpirun) relies on instead of WORLD_SIZE.
MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """Catch, before any work, the launches that would not make one run of several processes.

    Processes numbered only by MPI (mpirun, `srun` without torchrun) would each train alone and write the
    same run directory: refused. `accelerate launch --cpu --num_processes N` without mpirun starts one
    process (with MASTER_ADDR/PORT set for the N it was asked for): warned, since the run itself is sound.
    """
    if launched():
        return
    for key in MPI_WORLD_SIZES:
        size = os.environ.get(key, "1")
        if not size.isdigit() or int(size) < 2:
            continue
        raise UserError(
            f"{key}={size}: this process is one of {size} started by MPI (mpirun, srun), which textclass does not join into one "
            "run; each would train alone into the same run directory. Start them with torchrun (one per node, "
            "docs/scaling.md) or `accelerate launch --multi_gpu --num_processes N`"
        )
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_PORT" in os.environ:
        log.warning(
            "accelerate launch --cpu started this process alone (several processes on CPU need mpirun there): "
            "training with 1 process. For N processes use `accelerate launch --multi_gpu --num_processes N` "
            "(torchrun underneath, on CPU too) or `textclass train --nproc N`"
        )


def needs_cpu_flag() -> bool:
    """Under torchrun on a machine without an accelerator: accelerate (and so the Trainer) starts DDP on
    CPU only when told the run is on CPU (`use_cpu`); otherwise each process would train alone."""
    return launched() and torch.accelerator.current_accelerator() is None


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes the run directory and logs."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """A training entry point's scope: the process group started (under torchrun) and destroyed if this
    call started it, and textclass's log quiet on ranks other than 0 (each would repeat rank 0's lines)."""
    check_launch()
    if not launched() or active():
        yield
        return
    from accelerate import PartialState  # type: ignore[import-untyped]

    # torch.distributed from torchrun's env, with the backend that fits the device (gloo on CPU, nccl on CUDA)
    PartialState(cpu=needs_cpu_flag(), timeout=TIMEOUT)
    quiet = logging.getLogger("textclass")
    level = quiet.level
    if not is_main_process():
        quiet.setLevel(logging.ERROR)
    try:
        yield
        # Every rank leaves together (rank 0 last, after its reports): a rank that tears its process group down
        # while another still works with it can abort at exit (seen with DeepSpeed ZeRO-3's communication).
        barrier()
    finally:
        quiet.setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()
        # TrainingArguments keeps accelerate's shared state; a later run in this process starts afresh.
        from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

        AcceleratorState._reset_state(reset_partial_state=True)


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run by rank 0 alone, its result (or the `UserError` it raised) handed to every rank.

    For what must happen once (reading and splitting data, preparing or clearing the run directory,
    choosing the checkpoint to resume from): the other ranks wait, then all go on with the same value, or
    all stop with the same one-line error instead of waiting for a rank that is gone.
    """
    if not active():
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except UserError as err:
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 of each node runs the block first, then the node's other ranks: for caches written once and
    then read (tokenized splits, teacher logits), so that no two ranks write the same cache file.

    The Trainer's `TrainingArguments.main_process_first` does this, but the caches are filled before the
    Trainer exists; this is the same two barriers, on the group `session` started.
    """
    if not active():
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()


def check_sparse_gradients(network: nn.Module, backend: str | None) -> None:
    """DDP all-reduces sparse gradients (fastText's hashed table) over gloo only; NCCL has no sparse
    all-reduce. Refused here in one line rather than failing in the first backward pass."""
    if backend not in (None, "gloo") and sparse_parameters(network):
        raise UserError(
            f"this model has a sparse embedding table (fastText), whose gradients torch.distributed cannot reduce over "
            f"{backend}; train it with one process, or on CPU (CUDA_VISIBLE_DEVICES= torchrun ...: gloo)"
        )


def backend() -> str | None:
    """The process group's backend (gloo, nccl, ...); None in a single process."""
    return str(dist.get_backend()) if active() else None


def refuse_nproc(nproc: int) -> None:
    """`--nproc` is for a plain command line: refused below 1 and inside a run torchrun already started."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: the number of training processes must be at least 1")
    if launched():
        raise UserError(
            f"--nproc: this process is already one of {os.environ.get('WORLD_SIZE')} started by torchrun (or accelerate "
            "launch); drop --nproc (or run `textclass train --nproc N` without a launcher)"
        )


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m textclass ARGV` as `nproc` processes on this machine through torchrun; returns the exit
    code (rank 0's when a rank failed, so that a user error still exits 2).

    Single node only, addressed on the loopback interface: the rendezvous store and the processes'
    addresses are 127.0.0.1, and gloo's sockets on `lo` unless GLOO_SOCKET_IFNAME says otherwise. (torch's
    TCPStore itself listens on every interface, whatever address it is given; docs/scaling.md.)
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = parse_args(["--standalone", "--local-addr", "127.0.0.1", "--nproc-per-node", str(nproc), "-m", "textclass", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        # Rank 0's own exit code when it exited; else another rank's (a user error reaches every rank, and
        # whichever exits first makes torchrun stop the others with a signal: a negative exit code)
        failures = err.failures
        codes = [failures[0].exitcode] if 0 in failures else []
        codes += [f.exitcode for r, f in sorted(failures.items()) if r != 0]
        return next((c for c in codes if c > 0), 1)
    return 0
