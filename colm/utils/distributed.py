"""Data parallelism under torchrun (torch.distributed): who this process is, and the few collectives colm uses.

`torchrun --nproc_per_node=N -m colm.main ...` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE in their
environment; `init()` (called by colm.main) joins them into one process group: nccl when CUDA is there (each
process on GPU LOCAL_RANK), gloo on CPU. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and every
function here is a no-op that answers as a single process would (rank 0 of 1), so no code path changes.

See docs/distributed.md for what the Trainer and the Evaluator do with it.
"""

import os

import torch
import torch.distributed as dist


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Whether this process writes files and logs (rank 0, or the only process)."""
    return rank() == 0


def init() -> bool:
    """Joins the torchrun process group when WORLD_SIZE > 1 (idempotent); returns whether this call created it."""
    if _env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        # Before the model is built: Model(device="auto") then lands on this process's own GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    if is_main():
        print(f"[colm] distributed: {dist.get_world_size()} processes, backend {dist.get_backend()}", flush=True)
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the other ranks; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(value: float) -> float:
    """The sum of a number over every rank (the number itself in a single process)."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def writes_files(call) -> bool:
    """Whether a moma call writes files (save_weights, ...): those run on rank 0 only. Every other call (load_weights,
    gate or router updates) changes the model each rank holds, so it runs on every rank."""
    return getattr(call, "__name__", "").startswith("save")


def run_moma_calls(calls, model) -> None:
    """Runs moma calls as one process would: writers on rank 0 only, followed by a barrier so that a later call (the
    load_weights of best.pt after the save of finish.pt) on any rank sees the file complete."""
    for call in calls:
        if writes_files(call):
            if is_main():
                call(model)
            barrier()
        else:
            call(model)
