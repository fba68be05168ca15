"""torchrun: the process group, each rank's share of a batch, and what rank 0 decides and
hands to the others. A process started without torchrun is a world of one, and nothing here
costs it anything.

Every rank draws the same permutation and the same augmentations from the same generator,
and takes every `size`-th image of each global batch (`data.TrainingSet.batches`' `part`): the
batches do not depend on the number of processes, so a run may resume with another number of
them.
"""

from __future__ import annotations

import io
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import models, processes


def launch(processes: int, arguments: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node PROCESSES -m cifar_experiments ARGUMENTS`, in
    this process; answers the exit status. The ranks say what went wrong, so torchrun's own
    report of it is left out."""
    # torchrun's loggers take their level from LOGLEVEL as they are made, on import.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each rank takes its share (World.join)
    command = ["--standalone", f"--nproc-per-node={processes}", "-m", "cifar_experiments"]
    try:
        run(parse_args([*command, *arguments]))
    except ChildFailedError as failure:
        code = failure.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # -9: killed by SIGKILL
    except SignalException as stop:
        return 128 + stop.sigval
    return 0


def lost_a_rank(error: BaseException) -> bool:
    """Whether `error` is a failed exchange between the ranks, most often because one is gone:
    raised in torch.distributed, or in a backward pass by the gradients' exchange."""
    where = "".join(frame.filename for frame in traceback.extract_tb(error.__traceback__))
    said = str(error).lower()
    return "torch/distributed/" in where.replace("\\", "/") or "gloo" in said or "nccl" in said


class WorldError(ValueError):
    """The training cannot be split over these processes; the message says why."""


@dataclass(frozen=True)
class World:
    """The processes one training runs in, as torchrun describes them to each."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # the processes on this machine
    node: int = 0  # this machine's place among the machines
    restart: int = 0  # how often torchrun has restarted the group (--max-restarts)
    launch: str | None = None  # torchrun's id for this launch, the same across its restarts

    @classmethod
    def from_environment(cls) -> World:
        env = os.environ
        if "TORCHELASTIC_RUN_ID" not in env and "RANK" not in env:
            return cls()
        return cls(
            rank=int(env.get("RANK", 0)),
            size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            node=int(env.get("GROUP_RANK", 0)),
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            launch=env.get("TORCHELASTIC_RUN_ID"),
        )

    @property
    def main(self) -> bool:
        """The rank that records the run, checkpoints it and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def node_id(self) -> str | None:
        """The name this machine's system metrics go under, when there are several processes."""
        return f"node_{self.node}" if self.distributed else None

    def check_batch(self, batch_size: int) -> None:
        """Every rank takes the same share of each global batch, or the gradients' average
        would weigh images unequally."""
        if batch_size % self.size:
            raise WorldError(
                f"--batch-size {batch_size} cannot be shared equally by {self.size} processes: "
                f"give a multiple of {self.size}, or fewer processes"
            )

    def join(self, device: str) -> None:
        """Join the process group (NCCL on CUDA, gloo elsewhere; `device` as --device names
        it), with this rank's share of the machine's cores."""
        if not self.distributed:
            return
        torch.set_num_threads(processes.threads_per_worker(self.local_size))
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
        # On CUDA the gradients go through NCCL, and the small messages below stay on the CPU.
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        dist.init_process_group(backend, store=self._store(), rank=self.rank, world_size=self.size)

    def _store(self) -> dist.Store:
        """torchrun's key-value store, under a prefix of this attempt's own: a restarted group
        would otherwise find its ranks' addresses of the attempt before, and call them in vain
        (pytorch/pytorch#167288)."""
        env = os.environ
        store = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), self.size,
            # torchrun's agent serves it, or else rank 0 does.
            is_master=self.main and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        )  # fmt: skip
        return dist.PrefixStore(f"cifar-experiments/attempt-{self.restart}", store)

    def leave(self, together: bool = False) -> None:
        """Leave the process group; `together`, once every rank is done (a training all ranks
        finished): one that tears its connections down while rank 0 still records can abort
        at exit ("terminate called without an active exception")."""
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` with its gradients averaged over the ranks after each backward pass."""
        if not self.distributed:
            return model
        if next(model.parameters()).is_cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # A network that freezes a parameter after some epochs (airbench's whitening bias)
        # leaves it out of later backward passes.
        network: Any = getattr(model, "_orig_mod", model)  # compiled: the network it compiled
        freezes = type(network).begin_epoch is not models.CifarNet.begin_epoch
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=freezes)

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def agree_on_stop(self, pending: int | None) -> int | None:
        """A stop request any rank has, for every rank at once: they must stop at the same step,
        or those still training would wait on the others' gradients for ever."""
        if not self.distributed:
            return pending
        signal = torch.tensor([pending or 0])
        dist.all_reduce(signal, op=dist.ReduceOp.MAX)
        return int(signal.item()) or None

    def share(self, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Rank 0's `value` (plain values and tensors) on every rank; None when rank 0 has
        nothing to hand on (it refused to start). Read back without running pickled code."""
        if not self.distributed:
            return value
        payload = b""
        if self.main and value is not None:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            payload = buffer.getvalue()
        size = torch.tensor([len(payload)], dtype=torch.int64)
        dist.broadcast(size, src=0)
        if not size.item():
            return value
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        if self.main:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        if self.main:
            return value
        return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


class Handoff:
    """What rank 0 hands the other ranks as a training starts (`World.share`): sent once, and
    nothing, which sends them home, if rank 0 leaves this block without having sent it."""

    def __init__(self, world: World) -> None:
        self.world, self.sent, self.handed = world, False, False

    def send(self, value: dict[str, Any] | None) -> None:
        if not self.sent:
            self.sent, self.handed = True, value is not None
            self.world.share(value)

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exception: object) -> None:
        self.send(None)
