"""The few things every script needs: distributed setup, seeding, checkpoints, metrics, logging.

Plain functions, no state of their own: each script calls what it needs from main().
"""
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run sets none

def setup_distributed(device_arg=None):
    """Returns (rank, local_rank, world_size, device). Starts the process group under torchrun."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_arg or default_device())
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # a timeout bounds how long the others wait when one process dies instead of hanging forever
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sums a tensor over processes in place (a no-op on one process). This is a sync point."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    """Element-wise maximum over processes, in place (a no-op on one process). This is a sync point."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# -----------------------------------------------------------------------------
# seeding: every random draw of a run is a function of (seed, step, rank), so a resumed run
# needs no saved RNG state to repeat the same draws

def seed_from(*numbers):
    """A well-mixed 63-bit seed from a few non-negative integers, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds CUDA too
    np.random.seed(seed % 2**32)


def set_deterministic(deterministic):
    """cudnn autotuning picks the fastest kernels but not always the same ones: off when asked for repeatability."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# -----------------------------------------------------------------------------
# checkpoints

def unwrap_state_dict(state_dict):
    """Drops the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes so a checkpoint loads anywhere."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        clean[key] = value
    return clean


def save_checkpoint(checkpoint, path):
    """Atomic write: a kill during the save leaves the previous file at `path` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it takes the name: a power cut cannot leave an empty last.pt
    os.replace(tmp, path)  # atomic on POSIX and Windows


def load_checkpoint(path):
    """Loads one of our checkpoints with weights_only=True: no pickled code in it can run.

    Raises SystemExit with one clear line for a missing file, a file that is not a checkpoint,
    or one that carries arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {path} is not a checkpoint this code can load safely "
                         f"(loaded with weights_only=True, which refuses pickled code): {first_line}")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "classes" not in checkpoint:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py "
                         "(expected a dict with 'model' and 'classes')")
    return checkpoint


# -----------------------------------------------------------------------------
# metrics: counts are accumulated on the device and read once at the end (no per-step sync)

def topk_correct(logits, targets, ks):
    """Number of samples whose target is among the top-k predictions, for each k, as a tensor."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == targets[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


# -----------------------------------------------------------------------------
# logging: rank 0 prints, and also appends to a log file when given one

def make_logger(path=None, enabled=True):
    log_file = open(path, "a") if (enabled and path) else None

    def log(message=""):
        if not enabled:
            return
        print(message, flush=True)
        if log_file:
            log_file.write(message + "\n")
            log_file.flush()
    return log


def format_table(rows, header):
    """Fixed-width text table: rows is a list of lists of strings."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def stderr(message):
    print(message, file=sys.stderr, flush=True)
