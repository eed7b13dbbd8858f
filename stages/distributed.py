"""torch.distributed set-up from whichever launcher started us, and collectives that degrade to the
identity in a single process.

Three launchers are recognised, in this order:

1. **torchrun** (or any launcher following its convention): ``RANK``, ``WORLD_SIZE`` and usually
   ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` are set.
2. **SLURM, inside an srun step**: ``SLURM_PROCID`` (rank), ``SLURM_NTASKS`` (world size; the
   reference implementation forgets it and takes ``WORLD_SIZE`` from the environment, which plain
   srun never sets), ``SLURM_LOCALID`` (local rank). ``MASTER_ADDR`` is the first host of the job's
   node list (``scontrol show hostnames``; without scontrol the list is parsed here, then
   ``SLURM_LAUNCH_NODE_IPADDR``); ``MASTER_PORT`` is ``10000 + SLURM_JOB_ID % 20000`` unless set.
   A batch script that runs Python without srun is one process whatever ``--ntasks`` says: it has no
   step, so it is treated as a single process (with a warning when more tasks were requested).
3. **A single process**: rank 0 of 1, no process group.

A process group is created only when the world size is larger than 1: ``nccl`` when CUDA is
available (each process on ``cuda:local_rank``), ``gloo`` on CPU, ``env://`` rendezvous with a
timeout. Every helper below works with or without a process group (lightly's guard,
``dist.is_available() and dist.is_initialized()``), so losses and evaluations run in CPU unit tests.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping

import torch
import torch.distributed as dist

from stages.cli import StageError

logger = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "single"]

#: MASTER_PORT under SLURM is PORT_BASE + job id % PORT_SPAN, so that jobs sharing a node differ.
PORT_BASE = 10000
PORT_SPAN = 20000
DEFAULT_TIMEOUT = timedelta(minutes=30)


class LaunchError(StageError):
    """The launcher's environment is inconsistent (names the variable), or the rendezvous failed."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher's environment variables say, before anything is initialised.

    Attributes:
        launcher: which launcher was recognised.
        rank: global rank of this process, in [0, world_size).
        world_size: number of processes taking part.
        local_rank: rank of this process on its node (selects the GPU).
        master_addr: rendezvous host (None for a single process).
        master_port: rendezvous port (None for a single process).
    """

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands after `init_distributed`.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node.
        device: ``cuda:<local_rank mod visible GPUs>`` when CUDA is available, else ``cpu``.
        is_main: rank == 0 (the process that writes outputs and logs).
        initialized: whether a process group exists (False for a single process).
        launcher: the launcher recognised.
        backend: the process group's backend, None without a process group.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    initialized: bool
    launcher: Launcher = "single"
    backend: str | None = None


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _first_of_range_list(body: str) -> str:
    """First value of a bracket body such as ``"01-03,07"`` (zero padding kept) -> ``"01"``."""
    first = body.split(",", 1)[0]
    return first.split("-", 1)[0]


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM host list, as ``scontrol show hostnames`` would print it.

    Handles lists such as ``"node[03-05,9],gpu1"``, ``"rack[1-2]-n[01-04]"`` and ``"vm"``.

    Args:
        nodelist: the compressed host list (``SLURM_JOB_NODELIST``).

    Returns:
        The first host name.

    Raises:
        LaunchError: the list is empty or its brackets do not balance.
    """
    text = nodelist.strip()
    if not text:
        raise LaunchError("SLURM_JOB_NODELIST is empty")
    # The first top-level comma ends the first host expression.
    depth = 0
    end = len(text)
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            end = i
            break
    expression = text[:end]
    if depth < 0 or expression.count("[") != expression.count("]") or not expression:
        raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: _first_of_range_list(m.group(1)), expression)
    if "[" in host or "]" in host or not host:
        raise LaunchError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return host


def _scontrol_first_host(nodelist: str) -> str | None:
    """First host from `scontrol show hostnames`, or None when scontrol is missing or fails."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        result = subprocess.run(
            [scontrol, "show", "hostnames", nodelist],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("scontrol show hostnames %s failed (%s); parsing the list instead", nodelist, exc)
        return None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        logger.warning("scontrol show hostnames %s failed: %s", nodelist, result.stderr.strip())
        return None
    return hosts[0]


def slurm_master_addr(env: Mapping[str, str], use_scontrol: bool = True) -> str:
    """The rendezvous host of a SLURM job: the first host of its allocation.

    Order: ``MASTER_ADDR`` if set; ``scontrol show hostnames $SLURM_JOB_NODELIST`` (only for lists
    with brackets: a plain ``a,b`` needs no expansion, and scontrol without a slurm.conf retries for
    a minute); the list parsed by `first_host`; ``SLURM_LAUNCH_NODE_IPADDR``.

    Args:
        env: the environment to read (``os.environ`` in practice).
        use_scontrol: ask scontrol first (tests turn it off to exercise the fallbacks).

    Raises:
        LaunchError: none of the sources gives a host.
    """
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        if use_scontrol and "[" in nodelist:
            host = _scontrol_first_host(nodelist)
            if host:
                return host
        try:
            return first_host(nodelist)
        except LaunchError:
            if not env.get("SLURM_LAUNCH_NODE_IPADDR"):
                raise
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"]
    raise LaunchError("SLURM job without SLURM_JOB_NODELIST or SLURM_LAUNCH_NODE_IPADDR: cannot find MASTER_ADDR")


def slurm_master_port(env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` if set, else ``PORT_BASE + SLURM_JOB_ID % PORT_SPAN`` (10000..29999)."""
    if env.get("MASTER_PORT"):
        return _int_var(env, "MASTER_PORT")
    return PORT_BASE + _int_var(env, "SLURM_JOB_ID") % PORT_SPAN


def detect_launcher(env: Mapping[str, str] | None = None, use_scontrol: bool = True) -> LaunchEnv:
    """Read the launcher's variables; starts nothing.

    Args:
        env: environment to read; defaults to ``os.environ``.
        use_scontrol: whether SLURM host lists may be expanded with scontrol.

    Returns:
        The `LaunchEnv`. Under torchrun, ``MASTER_ADDR``/``MASTER_PORT`` default to 127.0.0.1 and
        29500 (torchrun's own defaults) when a multi-process world leaves them out.

    Raises:
        LaunchError: a variable is missing, not an integer, or the ranks are out of range.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher: Launcher = "torchrun"
        rank = _int_var(env, "RANK")
        world_size = _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK", default=rank)
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _int_var(env, "MASTER_PORT", default=29500)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        launcher = "slurm"
        rank = _int_var(env, "SLURM_PROCID")
        # Inside a step srun exports the step's task count as SLURM_NTASKS (srun -n1 in an -n2
        # allocation sees 1); SLURM_STEP_NUM_TASKS says the same and is the fallback.
        if "SLURM_NTASKS" in env:
            world_size = _int_var(env, "SLURM_NTASKS")
        else:
            world_size = _int_var(env, "SLURM_STEP_NUM_TASKS")
        local_rank = _int_var(env, "SLURM_LOCALID", default=0)
        addr = port = None
        if world_size > 1:
            addr = slurm_master_addr(env, use_scontrol=use_scontrol)
            port = slurm_master_port(env)
    else:
        if "SLURM_JOB_ID" in env and _int_var(env, "SLURM_NTASKS", default=1) > 1:
            logger.warning(
                "SLURM job %s asked for %s tasks but this process was not started by srun: running as "
                "one process (start the script with srun to use all tasks)",
                env.get("SLURM_JOB_ID"), env.get("SLURM_NTASKS"),
            )
        return LaunchEnv("single", rank=0, world_size=1, local_rank=0)
    if world_size < 1:
        raise LaunchError(f"world size must be >= 1, got {world_size} ({launcher})")
    if not 0 <= rank < world_size:
        raise LaunchError(f"rank {rank} is outside [0, {world_size}) ({launcher})")
    if local_rank < 0:
        raise LaunchError(f"local rank must be >= 0, got {local_rank} ({launcher})")
    return LaunchEnv(launcher, rank, world_size, local_rank, addr if world_size > 1 else None,
                     port if world_size > 1 else None)


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        # With one GPU per task (--gpus-per-task) each process sees a single device 0.
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Initialise torch.distributed from torchrun, srun, or nothing (a single process).

    Idempotent: if a process group already exists it is described, not re-created.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (nccl when CUDA is available, else gloo).
        timeout: rendezvous and collective timeout.

    Returns:
        The `DistInfo` of this process. On CUDA machines the current CUDA device is set to
        ``info.device``.

    Raises:
        LaunchError: inconsistent launcher variables, nccl without CUDA, or a failed rendezvous.
    """
    if _is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return DistInfo(rank, world, local_rank, _device_for(local_rank), rank == 0, True,
                        "torchrun" if "RANK" in os.environ else "slurm", dist.get_backend())
    launch = detect_launcher()
    device = _device_for(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size == 1:
        logger.info("single process (%s launcher), device %s", launch.launcher, device)
        return DistInfo(0, 1, launch.local_rank, device, True, False, launch.launcher, None)
    if not dist.is_available():
        raise LaunchError(f"{launch.launcher} started {launch.world_size} processes but torch.distributed is unavailable")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend nccl needs CUDA, which is not available: use gloo")
    # env:// reads these; torchrun already set them, srun did not.
    os.environ["MASTER_ADDR"] = str(launch.master_addr)
    os.environ["MASTER_PORT"] = str(launch.master_port)
    os.environ["RANK"] = str(launch.rank)
    os.environ["WORLD_SIZE"] = str(launch.world_size)
    os.environ["LOCAL_RANK"] = str(launch.local_rank)
    logger.info(
        "rank %d/%d (local %d, %s) joining %s:%s with %s",
        launch.rank, launch.world_size, launch.local_rank, launch.launcher,
        launch.master_addr, launch.master_port, backend,
    )
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise LaunchError(
            f"rank {launch.rank}/{launch.world_size} could not join {launch.master_addr}:{launch.master_port} "
            f"({backend}): {exc}"
        ) from exc
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device, launch.rank == 0, True,
                    launch.launcher, backend)


def get_rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if _is_dist() else 0


def get_world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if _is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0 (always true without a process group)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; returns at once without a process group."""
    if not _is_dist():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `tensor` over all ranks, as a new detached tensor.

    Args:
        tensor: floating-point tensor of the same shape (any) on every rank, on the backend's device
            (CUDA for nccl).

    Returns:
        A tensor of the same shape and dtype; without a process group a detached copy of the input.

    Raises:
        TypeError: the tensor is not floating point (a mean of integers would truncate).
    """
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}")
    out = tensor.detach().clone()
    if not _is_dist():
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out /= dist.get_world_size()
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order; ranks may hold different counts.

    Each rank pads its rows to the largest count, gathers, and the padding is cut off again. No
    gradient flows through the result (use it for features and labels, not for losses).

    Args:
        tensor: shape (N_r, *S): N_r may differ between ranks (0 included), S and dtype must not.

    Returns:
        Shape (sum_r N_r, *S); without a process group a detached copy of the input.

    Raises:
        ValueError: a 0-dim tensor, or trailing shapes that differ between ranks.
    """
    if tensor.dim() == 0:
        raise ValueError("all_gather_cat needs a tensor with at least one dimension, got a scalar")
    tensor = tensor.detach()
    if not _is_dist():
        return tensor.clone()
    world = dist.get_world_size()
    device = tensor.device
    # 1. every rank's shape (all have the same number of dims, or the trailing-shape check fails).
    ndim = torch.tensor([tensor.dim()], dtype=torch.long, device=device)
    ndims = [torch.empty_like(ndim) for _ in range(world)]
    dist.all_gather(ndims, ndim)
    if any(int(n) != tensor.dim() for n in ndims):
        raise ValueError(f"all_gather_cat: ranks hold tensors with {[int(n) for n in ndims]} dimensions")
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_list = [tuple(int(v) for v in s.tolist()) for s in shapes]
    if any(s[1:] != tuple(tensor.shape[1:]) for s in shapes_list):
        raise ValueError(f"all_gather_cat: trailing shapes differ between ranks: {shapes_list}")
    counts = [s[0] for s in shapes_list]
    # 2. pad to the largest count, gather, unpad.
    max_count = max(counts)
    padded = tensor.new_zeros((max_count, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts)], dim=0)


def cleanup() -> None:
    """Destroy the process group if there is one (call at the end of a distributed run)."""
    if _is_dist():
        dist.destroy_process_group()
