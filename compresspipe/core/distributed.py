"""Several processes under torchrun: one process group, rank 0 in charge, state broadcast from it.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); without them, or with
WORLD_SIZE 1, every function here is a cheap no-op and nothing of torch.distributed is touched.
Backend: gloo for CPU, nccl for CUDA (one GPU per process, cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CompressPipeError

# Each rank appends digests of its artifact before and after the stage-end broadcast here
# (one JSON line per stage, file rank<N>.jsonl): a check that replicas did not drift.
DIGESTS_ENV = "COMPRESSPIPE_DEBUG_DIGESTS"
TIMEOUT_ENV = "COMPRESSPIPE_DIST_TIMEOUT_MIN"  # how long a rank waits in one collective


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise CompressPipeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # a stray RANK without a multi-process WORLD_SIZE must not silence a single process
    return int(os.environ.get("RANK", "0") or 0) if env_world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return rank() == 0


def distributed_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes its own GPU, cuda:LOCAL_RANK."""
    if env_world_size() <= 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise CompressPipeError(f"device: {device} pins every process to one GPU; under torchrun "
                                "use 'auto' or 'cuda' (process N uses cuda:LOCAL_RANK)")
    if local_rank() >= torch.cuda.device_count():
        raise CompressPipeError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} "
                                "GPUs are visible: start at most one process per GPU")
    return torch.device("cuda", local_rank())


def init(device: torch.device) -> bool:
    """Join the process group that torchrun's environment describes.

    Returns True when this call created the group (then ``cleanup`` should end it)."""
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CompressPipeError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set; "
                                "start several processes with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=timedelta(minutes=_timeout_minutes()))
    return True


def _timeout_minutes() -> float:
    # the other ranks wait in a broadcast while rank 0 alone measures and logs a stage, which
    # can outlast nccl's 10-minute default on a large test set
    value = os.environ.get(TIMEOUT_ENV, "60")
    try:
        minutes = float(value)
    except ValueError:
        minutes = 0.0
    if minutes <= 0:
        raise CompressPipeError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of minutes")
    return minutes


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- broadcasts from rank 0 --------------------------------------------------------------------


@torch.no_grad()
def broadcast_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every rank's tensors in place with rank 0's (same names and shapes everywhere).

    One collective per dtype: the tensors are packed into a flat buffer first."""
    if world_size() == 1 or not tensors:
        return
    device = _comm_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for name in sorted(tensors):
        by_dtype.setdefault(tensors[name].dtype, []).append(tensors[name])
    for dtype, group in by_dtype.items():
        wire = torch.uint8 if dtype == torch.bool else dtype  # not every backend carries bool
        flat = torch.cat([t.detach().reshape(-1).to(device, wire) for t in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in group:
            t.copy_(flat[offset: offset + t.numel()].view(t.shape).to(t.device, dtype))
            offset += t.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (e.g. BatchNorm statistics after training)."""
    broadcast_tensors(dict(module.state_dict(keep_vars=True)))


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's ``data`` on every rank (None there arrives as b"")."""
    if world_size() == 1:
        return data or b""
    device = _comm_device()
    size = torch.tensor([len(data or b"") if is_main() else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if is_main():
        payload = torch.frombuffer(bytearray(data or b"\0"), dtype=torch.uint8)[: int(size)]
        payload = payload.to(device)
    else:
        payload = torch.empty(int(size), dtype=torch.uint8, device=device)
    if int(size):
        dist.broadcast(payload, src=0)
    return payload.cpu().numpy().tobytes()


def broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-serialisable ``value`` on every rank (no pickle on the wire)."""
    if world_size() == 1:
        return value
    text = json.dumps(value).encode() if is_main() else None
    return json.loads(broadcast_bytes(text).decode())


@contextlib.contextmanager
def shared_directory(source: Path) -> Iterator[Path]:
    """Rank 0's directory ``source`` on every rank: rank 0 yields it as is, the others a
    temporary copy of its files received over the process group (no shared filesystem needed).

    The copy is removed on exit."""
    if world_size() == 1:
        yield source
        return
    if is_main():
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else []
        index = [[p.relative_to(source).as_posix(), p.stat().st_size] for p in files]
        broadcast_json(index)
        if files:
            broadcast_bytes(b"".join(p.read_bytes() for p in files))
        yield source
        return
    index = broadcast_json(None)
    target = Path(tempfile.mkdtemp(prefix="compresspipe-rank"))
    try:
        if index:
            blob = broadcast_bytes(None)
            offset = 0
            for name, size in index:
                path = target / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob[offset: offset + size])
                offset += size
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def sync_rng() -> None:
    """Every rank continues with rank 0's torch random state, so code that draws from the global
    generator (e.g. an unseeded shuffle) makes the same draws everywhere."""
    if world_size() == 1:
        return
    state = torch.get_rng_state()
    broadcast_tensors({"cpu": state})
    torch.set_rng_state(state)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        cuda = torch.cuda.get_rng_state()
        broadcast_tensors({"cuda": cuda})
        torch.cuda.set_rng_state(cuda)


# -- reductions --------------------------------------------------------------------------------


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(metrics: dict[str, float], count: int) -> dict[str, float]:
    """Means measured over ``count`` samples on each rank -> means over all the samples."""
    keys = sorted(metrics)
    sums = all_reduce_sum([float(count)] + [metrics[k] * count for k in keys])
    return {k: s / max(sums[0], 1.0) for k, s in zip(keys, sums[1:], strict=True)}


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank: all ranks then take the same branch."""
    if world_size() == 1:
        return flag
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


@torch.no_grad()
def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DistributedDataParallel does not manage (the
    trainable modules of training hooks). A gradient missing on every rank stays None."""
    params = [p for p in params if p.requires_grad]
    if world_size() == 1 or not params:
        return
    device = _comm_device()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(device, torch.float32) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=device)])
    dist.all_reduce(flat)
    offset = 0
    present = flat[-len(params):]
    for i, p in enumerate(params):
        chunk = flat[offset: offset + p.numel()]
        offset += p.numel()
        if present[i] == 0:
            continue
        grad = (chunk / world_size()).view(p.shape).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


def check_same_structure(module: torch.nn.Module, where: str) -> None:
    """One clear error when ranks hold differently shaped models (before DDP would hang or fail)."""
    if world_size() == 1:
        return
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in module.state_dict().items()]
    digest = hashlib.sha256(json.dumps(layout).encode()).digest()[:8]
    mine = int.from_bytes(digest, "little") % (1 << 52)  # exact in float64
    reference = broadcast_json(mine)
    if not all_ranks_true(mine == reference):
        raise CompressPipeError(f"{where}: the model differs between ranks (parameter names or "
                                "shapes); a decision made from rank-local data diverged")


# -- replica digests (debugging) ---------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def record_digests(stage: str, **groups: Mapping[str, Mapping[str, torch.Tensor]] | None) -> None:
    """With COMPRESSPIPE_DEBUG_DIGESTS=DIR, append {stage, group: {part: digest}} to
    DIR/rank<N>.jsonl; otherwise do nothing."""
    directory = os.environ.get(DIGESTS_ENV)
    if not directory:
        return
    line = {"stage": stage, "rank": rank(), "world_size": world_size()}
    for group, parts in groups.items():
        if parts is not None:
            line[group] = {k: tensor_digest(v) for k, v in parts.items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"rank{rank()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Ranks other than 0 print nothing to stdout: the run's output is rank 0's."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
