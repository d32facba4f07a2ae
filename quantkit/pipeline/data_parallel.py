"""Data-parallel calibration: each rank runs its share of the calibration samples through the
working layer, and the statistics the methods act on are summed across ranks before they act.

GPTQ's Hessians (``HessianAccumulator.state``: the raw sum ``Σ x xᵀ`` and the token count) and
AWQ's input statistics (``ActivationStats``: ``Σ xᵀx``, ``Σ |x|``, the count) are plain sums, so
one all-reduce (sum) gives every rank the statistics of all the samples, and every rank then
computes the same quantized weights. Launch with ``torchrun`` (NCCL on GPUs) or, on the CPU,
with the gloo backend; a process group must be initialised before ``quantize_model`` runs.

``launch`` does that for ``quantkit quantize`` (``compress``): under ``torchrun`` or ``accelerate
launch`` (``WORLD_SIZE`` > 1 in the environment) it joins the process group — NCCL when the
working layer is on a GPU, which is then ``cuda:LOCAL_RANK``, gloo on the CPU — and says which
rank writes the output (rank 0; the others wait for it at a barrier).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from quantkit.errors import QuantkitError

TIMEOUT_ENV = "QUANTKIT_DIST_TIMEOUT_S"  # how long a rank waits for the others (collectives, the final barrier)
DEFAULT_TIMEOUT_S = 3600  # rank 0 writing a 70B checkpoint while the others wait can take minutes


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel | None:
        """The initialised default group, or None when running alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of ``tensor`` over ranks in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def row_bounds(self, rows: int) -> list[tuple[int, int]]:
        """Each rank's contiguous block of ``rows`` rows (sizes differ by at most one)."""
        base, extra = divmod(rows, self.world_size)  # the first ``extra`` ranks take one more, as tensor_split
        starts = [r * base + min(r, extra) for r in range(self.world_size + 1)]
        return list(zip(starts, starts[1:]))

    def gather_rows(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank's block of rows (``row_bounds(rows)``) joined in rank order, on every rank:
        one broadcast per rank, so the blocks may differ in size on any backend."""
        pieces = []
        for src, (start, end) in enumerate(self.row_bounds(rows)):
            if src == self.rank:
                piece = part.contiguous()
            else:
                piece = torch.empty((end - start, *part.shape[1:]), dtype=part.dtype, device=part.device)
            dist.broadcast(piece, src)
            pieces.append(piece)
        return torch.cat(pieces)


def shard_samples(samples: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of the calibration samples: one contiguous block each, so with a
    batch size dividing the block the ranks' batches are exactly the single process's batches."""
    return samples.tensor_split(world_size)[rank]


@dataclass
class Launch:
    """Where this process stands in a ``torchrun`` launch (or alone: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # the working layer's device: cuda:LOCAL_RANK under torchrun with --device cuda
    group: DataParallel | None = None  # None when alone
    owns_group: bool = False  # this launch initialised the process group (and ends it)

    @property
    def is_main(self) -> bool:
        """The rank that writes the checkpoint and prints the report."""
        return self.rank == 0

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's share of the (same, deterministic) sample list every rank loaded."""
        if self.group is None:
            return samples
        if samples.shape[0] < self.world_size:
            raise QuantkitError(f"{samples.shape[0]} calibration samples cannot be shared by {self.world_size} ranks: "
                                f"use at least {self.world_size} (--num-samples)")
        return shard_samples(samples, self.rank, self.world_size)

    def wait_for_main(self) -> None:
        """Every rank waits here until rank 0 has written the output."""
        if self.group is not None:
            _barrier(self.device)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The ranks' work. torchrun ends the other ranks with SIGTERM when one fails: inside,
        SIGTERM becomes ``SystemExit`` so ``finally`` blocks run (a temporary output folder is
        removed); a collective broken by a rank that stopped becomes one line naming this rank."""
        if not self.owns_group:
            yield
            return
        installed, previous = _exit_on_sigterm()
        try:
            yield
        except Exception as error:
            if _is_peer_failure(error):
                raise QuantkitError(f"rank {self.rank} lost contact with the other ranks: one of them stopped "
                                    f"(its message says why) [{_first_line(error)}]") from error
            raise
        finally:
            if installed:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def close(self) -> None:
        """End the process group this launch started (after a successful run; on an error the
        process exits and the launcher ends the other ranks)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def launch(device: str = "cpu") -> Launch:
    """Join the ranks of a ``torchrun`` / ``accelerate launch`` job, if this is one.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and, to meet, ``MASTER_ADDR``/``MASTER_PORT``)
    from the environment. A ``cuda`` device becomes ``cuda:LOCAL_RANK``, and the backend NCCL; the
    CPU uses gloo. A process group that is already initialised (a caller's own) is used as it is.
    Alone (no ``WORLD_SIZE`` or 1), nothing happens.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return Launch(rank, world, local, _rank_device(device, local, world), DataParallel.current())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Launch(device=device)
    if not dist.is_available():
        raise QuantkitError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    device = _rank_device(device, local, world)
    target = torch.device(device)
    options = {"timeout": timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))}
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantkitError(f"device '{device}' was asked for but no CUDA GPU is available")
        if target.index >= torch.cuda.device_count():
            raise QuantkitError(f"rank {rank} has LOCAL_RANK {local} but this host shows only "
                                f"{torch.cuda.device_count()} GPU(s): launch at most that many processes per node")
        torch.cuda.set_device(target)
        options["device_id"] = target
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo", rank=rank, world_size=world, **options)
    return Launch(rank, world, local, device, DataParallel(rank, world), owns_group=True)


def _rank_device(device: str, local_rank: int, world: int) -> str:
    """``cuda`` (or any ``cuda:N``, since every rank got the same option) is this rank's GPU."""
    try:
        target = torch.device(device)
    except RuntimeError:
        return device  # the caller's device check names the mistake
    if target.type == "cuda" and world > 1:
        return f"cuda:{local_rank}"
    return device


def _barrier(device: str) -> None:
    target = torch.device(device)
    if target.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[target.index])
    else:
        dist.barrier()


def _exit_on_sigterm():
    """Install a SIGTERM handler raising ``SystemExit``: (whether it was installed, the previous one)."""
    def handler(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process outright
        raise SystemExit(128 + signum)

    try:
        return True, signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return False, None  # not the main thread


def _is_peer_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                                  "NCCL communicator was aborted", "ProcessGroupNCCL"))


def _first_line(error: BaseException) -> str:
    """The gist of a backend's error: the line naming the broken connection, without its source location."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = next((line for line in lines if any(k in line for k in ("closed", "reset", "NCCL"))), lines[0] if lines else "")
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:553]"
    return text.split(". ")[0][:160]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise QuantkitError(f"environment variable {name}={value!r} is not an integer") from None
