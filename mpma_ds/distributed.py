"""The process group: joined under a launcher (``deepspeed``, ``torchrun``, SLURM), or made for one plain
``python`` process; small collectives the trainer needs (broadcast an object, sum a tensor, gather objects).

DeepSpeed is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_SINGLE_PROCESS_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
)
LOOPBACK_IFNAME = "lo"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the recipe's ``train.collective_timeout_s``: another rank is hung,
    dead or much slower."""


def is_collective_timeout(err: BaseException) -> bool:
    """True for the errors gloo / NCCL raise when a collective (or the store behind it) timed out, or when a
    peer rank died during one (its sockets closed)."""
    text = str(err).lower()
    names = {cls.__name__ for cls in type(err).__mro__}
    if "DistBackendError" in names or "DistStoreError" in names or "DistNetworkError" in names:
        return True
    return isinstance(err, RuntimeError) and any(
        key in text for key in ("timed out", "timeout", "connection closed by peer", "connection reset by peer")
    )


def world_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (1 process when unset).

    Raises:
        ValueError: one line when the launcher's numbers do not make a world (a rank outside ``[0, WORLD_SIZE)``,
            e.g. a node rank beyond the hostfile's nodes, or a value that is not a number).
    """
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ValueError(f"the launcher's RANK / WORLD_SIZE / LOCAL_RANK are not integers ({err})") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(
            f"the launcher's RANK={rank} is outside WORLD_SIZE={world} (LOCAL_RANK={local_rank}); check the node "
            "rank against the hostfile's nodes (0..nodes-1) and the slots per node"
        )
    return rank, world, local_rank


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a rendezvous on one machine)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> bool:
    """Join (or, for a plain ``python`` run, create) the process group: NCCL on CUDA, gloo on CPU.

    ``timeout_s`` bounds every collective (and NCCL's watchdog): a rank that waits longer for a hung or dead peer
    fails with an error instead of waiting forever. A plain ``python`` run (no launcher) is a group of one whose
    rendezvous is an in-process store: nothing listens beyond the loopback interface (the gloo / NCCL sockets
    are bound to ``lo`` unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` say otherwise).

    Returns True when this call created the group; the caller then calls ``close_distributed()``.
    """
    import deepspeed  # heavy (seconds to import): only when a group is made

    if dist.is_available() and dist.is_initialized():
        return False
    timeout = datetime.timedelta(seconds=float(timeout_s))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # a collective that outlives the timeout aborts the NCCL communicators and ends this rank (the launcher then
    # stops the others); set here too because the pdsh launcher forwards only NCCL_* variables to remote ranks
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if "RANK" not in os.environ:  # `python launch/pretrain.py`: a group of one, no launcher
        os.environ["MPMA_DS_SET_ENV"] = ",".join(k for k in _SINGLE_PROCESS_ENV if k not in os.environ)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())  # names DeepSpeed's CPU all-reduce buffer; nothing binds it
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_IFNAME)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", LOOPBACK_IFNAME)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        # torch's env:// rendezvous would start a TCPStore listening on every interface; one process needs none
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    use_environment_extensions_dir()
    if not torch.cuda.is_available() and os.environ.get("LOCAL_RANK", "0") == "0" and not cpu_comm_op_built():
        print(f"building DeepSpeed's CPU all-reduce op ({SHM_OP}): once per environment, 1-4 minutes on a busy "
              f"machine; later runs reuse it from {extensions_dir()} (make install builds it ahead)",
              file=sys.stderr, flush=True)  # fmt: skip
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    _unlink_shm_buffers()
    return True


SHM_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU all-reduce op, JIT-compiled by ``deepspeed.init_distributed`` on a machine without CUDA."""


def use_environment_extensions_dir() -> None:
    """JIT-built ops go to ``<environment>/torch_extensions`` (unless ``$TORCH_EXTENSIONS_DIR`` says otherwise):
    torch's shared default folder is rebuilt whenever another checkout's environment (other source paths) used
    it last, minutes each time; one folder per environment is built once (by ``make install``) and kept."""
    own = Path(sys.prefix) / "torch_extensions"
    if (
        "TORCH_EXTENSIONS_DIR" not in os.environ
        and sys.prefix != sys.base_prefix
        and os.access(sys.prefix, os.W_OK)
    ):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(own)


def extensions_dir() -> Path:
    """Where torch keeps JIT-built ops: ``$TORCH_EXTENSIONS_DIR``, else torch's default root + its build folder."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    accel = (
        f"rocm{torch.version.hip}"
        if torch.version.hip
        else f"cu{torch.version.cuda}"
        if torch.version.cuda
        else "cpu"
    )
    return (
        Path(get_default_build_root())
        / f"py{sys.version_info.major}{sys.version_info.minor}_{accel.replace('.', '')}"
    )


def cpu_comm_op_built() -> bool:
    """Whether a build of the CPU all-reduce op is there to load (a first run on this machine compiles it)."""
    return any(extensions_dir().glob(f"{SHM_OP}*/{SHM_OP}*.so"))


def build_cpu_comm_op() -> Path | None:
    """Compile the CPU all-reduce op now (``make install``), so the first run does not sit silent for minutes
    compiling it; ``None`` on a machine with CUDA (NCCL there) or where DeepSpeed has no such op."""
    if torch.cuda.is_available():
        return None
    from deepspeed.accelerator import get_accelerator

    use_environment_extensions_dir()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    builder.load()
    return extensions_dir()


SHM_DIR = Path("/dev/shm")


def shm_buffer_path(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce op (``deepspeed_shm_comm``) makes for ``rank``: its
    ``shm_initialize`` names it ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffers() -> None:
    """Unlink this rank's CPU all-reduce buffer as soon as every rank has mapped every other's.

    DeepSpeed 0.19 creates one ~69 MB file per rank in /dev/shm when all ranks of a CPU run are on one machine
    and never removes it: every 2-rank run left 138 MB of RAM behind (340 files, 19 GiB, until the kernel's
    OOM killer stopped a run). Each rank's ``shm_initialize`` returns only after it has opened and mapped the
    others' files, so after a barrier the names can go: the mappings live on until the processes end, and a
    run killed later leaves nothing behind either.
    """
    from deepspeed.comm import comm as ds_comm  # the module that holds `cdb` (the package re-exports a copy)

    # DeepSpeed's own condition for making the files, the same on every rank (the barrier needs all of them)
    world = dist.get_world_size() if dist.is_initialized() else 1
    uses_shm = getattr(ds_comm.cdb, "shm_comm_op", None) is not None and os.environ.get("LOCAL_SIZE") == str(world)
    if torch.cuda.is_available() or world < 2 or not uses_shm:
        return
    dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def close_distributed() -> None:
    """Destroy the group ``init_distributed`` created and undo its environment (in-process runs, tests)."""
    from deepspeed.comm import comm as ds_comm  # the module that holds `cdb` (the package re-exports a copy)

    if dist.is_initialized():
        dist.destroy_process_group()
    ds_comm.cdb = None  # DeepSpeed keeps its own handle; a later init must make a fresh one
    # ... and caches the groups it derived from the old world; forget them too (private module state).
    from deepspeed.utils import groups  # deepspeed: heavy, imported when a group is torn down only

    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
        "mpu",
        "mesh_device",
    ):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
    for key in filter(None, os.environ.pop("MPMA_DS_SET_ENV", "").split(",")):
        os.environ.pop(key, None)


def is_multi_process() -> bool:

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (a no-op in one process)."""

    box = [value]
    if is_multi_process():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks (through the GPU when the group is NCCL); returns a CPU tensor."""

    if is_multi_process():
        if torch.cuda.is_available():
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device)
            return on_device.cpu()
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""

    if not is_multi_process():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_to_rank0(value: Any) -> list[Any] | None:
    """``[value of rank 0, value of rank 1, ...]`` on rank 0, ``None`` on the others (a list of one in one
    process): the per-sample outputs of a sharded evaluation, merged where the metrics are computed."""

    if not is_multi_process():
        return [value]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def barrier() -> None:

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
