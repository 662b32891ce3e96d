"""Training on several processes launched by torchrun (PyTorch DDP), and the same code on one.

Kept apart from trainECAPAModel.py so that a reader of the single-process path meets none of it: every
function here is the identity, or says "rank 0 of 1", when the script runs without torchrun.

  setup()          -> reads RANK / LOCAL_RANK / WORLD_SIZE, joins the process group (nccl on CUDA, gloo on
                      CPU), picks this rank's device
  (the samplers in dataLoader.py take world_size and rank and give each rank its part of every epoch)
  gather_batch()   -> tensors concatenated over ranks, gradients flowing back to each rank's part
  gather_objects() -> picklable objects from every rank
  from_main()      -> rank 0's object on every rank (the resume state: only rank 0 need see the run folder)
  any_rank()       -> whether a flag (a stop request) is set on any rank
  share_buffers_of_main() -> rank 0's batch-norm statistics on every rank, before a checkpoint is evaluated
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def is_main():
    return rank() == 0


def available_cores():
    """The cores this process may use, shared among the processes torchrun started on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', '1')))


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def setup(device):
    """Join torchrun's process group when launched by it; returns this rank's device (cuda:LOCAL_RANK when
    `device` is CUDA). Without torchrun, returns `device` unchanged."""
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    # Ranks other than 0 wait in collectives while rank 0 writes checkpoints; allow for slow disks.
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(hours=2))
    return device


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_batch(*tensors):
    """Each tensor concatenated over all ranks in rank order. Gradients flow back to every rank's own part
    (torch.distributed.nn's all_gather); without torchrun the tensors are returned unchanged."""
    if world_size() == 1:
        return tensors
    return tuple(torch.cat(distributed_functional.all_gather(t.contiguous())) for t in tensors)


def gather_objects(obj):
    """[object of rank 0, object of rank 1, ...]; [obj] without torchrun."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_main(obj):
    """Rank 0's `obj` on every rank (a picklable object; the others' are ignored); `obj` without torchrun."""
    if world_size() == 1:
        return obj
    found = [obj]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def lost_a_process(error):
    """Whether `error`, raised under torchrun, says that a collective failed because another process of the run
    stopped or its machine became unreachable (gloo: 'Connection reset by peer'; NCCL: a DistBackendError)."""
    if world_size() == 1 or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistError) or any(word in str(error) for word in ('gloo', 'NCCL', 'Connection'))


def barrier():
    if world_size() > 1:
        dist.barrier()


def any_rank(flag):
    """True on every rank when `flag` is true on any of them; `flag` itself without torchrun."""
    if world_size() == 1:
        return flag
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    flags = torch.tensor([int(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def share_buffers_of_main(module):
    """Copy rank 0's buffers (batch-norm statistics) into every rank's `module`. Each rank's last training pass
    updates its own; the checkpoint rank 0 saves holds rank 0's, and every rank must evaluate those."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)
