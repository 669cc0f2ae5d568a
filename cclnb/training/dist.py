"""Process-group set-up and the few collectives the trainer needs.

One process (CPU or one GPU) is the default and never touches `torch.distributed`; several
processes come from `torchrun` (env:// rendezvous: RANK / WORLD_SIZE / LOCAL_RANK in the
environment) or from `--multiprocessing-distributed`, which spawns one process per *visible* GPU
(the authors hard-code 8). The process group gets a timeout, so a rank that dies makes the others
fail within a bounded time instead of hanging forever in a collective.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as tdist

from cclnb.errors import ConfigError, RankLost  # noqa: F401  (RankLost re-exported: dist.RankLost)

DEFAULT_TIMEOUT_S = 1800
# How a collective reports a peer that died (gloo: the socket closes; NCCL: the communicator
# aborts) or hung past the process group's timeout. torch raises these as RuntimeError (gloo) or
# DistError subclasses (NCCL, the store), so the message is what tells them from a bug.
_PEER_FAILURE_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                       "timed out", "nccl communicator was aborted")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA where there is none is a user error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is visible to PyTorch; "
                          "use --device cpu (or auto) or run on a machine with a GPU")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        index = local_rank % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device not in ("auto", "cpu"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU, where ops finish as they return):
    a wall clock read after it times the work, not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str, backend: str = "auto", dist_url: str = "env://",
          timeout_s: int = DEFAULT_TIMEOUT_S, gpu: int | None = None) -> DistContext:
    """Join the process group when launched by torchrun/spawn, else describe the single process
    (on GPU `gpu` when given, the authors' `--gpu`)."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    single_gpu = gpu if gpu is not None and world == 1 else rank
    local_rank = int(os.environ.get("LOCAL_RANK", str(single_gpu)))
    dev = resolve_device(device, local_rank)
    if world > 1 and not tdist.is_initialized():
        chosen = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and dev.type != "cuda":
            raise ConfigError("--dist-backend nccl needs CUDA devices; use gloo (or auto) on CPU")
        tdist.init_process_group(chosen, init_method=dist_url, world_size=world, rank=rank,
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def lost_peer(error: BaseException, ctx: DistContext) -> bool:
    """Whether `error` is a collective failing because another rank died or hung (as opposed to a
    bug or a bad input, which keep their own message)."""
    if not ctx.distributed or not isinstance(error, RuntimeError):
        return False
    if isinstance(error, getattr(tdist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(mark in text for mark in _PEER_FAILURE_MARKS)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) over ranks, in rank order; identity alone."""
    if not ctx.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients over ranks in one flat all-reduce (what DDP does, without needing a
    wrapper that would forbid CCL's second student forward before `backward`)."""
    if not ctx.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat.div_(ctx.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP's `broadcast_buffers`), so that all
    ranks hold identical models and any rank's checkpoint is *the* model."""
    if not ctx.distributed:
        return
    for buffer in module.buffers():
        tdist.broadcast(buffer, src=0)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on some rank (agreeing on stopping or diverging)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        tdist.barrier()


@torch.no_grad()
def shuffled_key_forward(key_forward: Callable[[torch.Tensor], torch.Tensor], im_k: torch.Tensor,
                         ctx: DistContext, generator: torch.Generator) -> torch.Tensor:
    """MoCo's shuffled BatchNorm across ranks: gather every rank's key images, apply one random
    permutation (drawn on rank 0 and broadcast), let each rank normalize its slice of the
    shuffled batch, gather the keys and undo the permutation. Returns this rank's keys."""
    local = im_k.shape[0]
    gathered = all_gather_cat(im_k, ctx)
    total = gathered.shape[0]
    perm = torch.randperm(total, generator=generator, device=generator.device).to(ctx.device)
    tdist.broadcast(perm, src=0)
    mine = perm[ctx.rank * local:(ctx.rank + 1) * local]
    keys = all_gather_cat(key_forward(gathered[mine]), ctx)
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys
    return unshuffled[ctx.rank * local:(ctx.rank + 1) * local]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned_worker(local_rank: int, world: int, port: int, target: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    target(*args)


def spawn_per_gpu(target: Callable, *args: object) -> None:
    """`--multiprocessing-distributed`: one process per visible GPU, each calling `target(*args)`
    with torchrun's environment variables set. `target` must be importable (a package function),
    which is why this entry point lives here and not in a notebook."""
    n = torch.cuda.device_count()
    if n < 1:
        raise ConfigError("--multiprocessing-distributed needs at least one visible CUDA GPU; "
                          "on CPU use `torchrun --nproc_per_node N -m cclnb train ...`")
    torch.multiprocessing.spawn(_spawned_worker, args=(n, _free_port(), target, args), nprocs=n,
                                join=True)
