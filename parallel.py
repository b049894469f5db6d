"""parallel.py: torch.distributed for train.py and eval.py under torchrun (one process per GPU, any
number of nodes): joining the process group, and the few collectives the scripts use, each checking
that its tensor is on this rank's device (NCCL only takes GPU tensors: a CPU scalar handed to it
stops the first step, while a CPU-only gloo test would never notice).
Tested by: python -m pytest tests/test_train.py -k "ddp or collective"
"""
import os
import torch
import torch.distributed as dist


def init_distributed(device):
    """Under torchrun: join the process group (nccl on GPU, gloo on CPU) and take the GPU of this
    process's LOCAL rank (several nodes: RANK is global, LOCAL_RANK counts within the node).
    -> (ddp, rank, world_size, device); outside torchrun (False, 0, 1, device)."""
    if 'RANK' not in os.environ:
        return False, 0, 1, device
    cuda = torch.cuda.is_available() and not str(device).startswith('cpu')
    dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def _checked(tensor, device):
    if tensor.device != torch.device(device):
        raise RuntimeError(f'collective on a {tensor.device} tensor while this rank trains on {device}: '
                           'NCCL needs every tensor on the rank\'s own GPU')
    return tensor


def all_reduce(tensor, device, op='sum'):
    """In place over all ranks (no-op outside torchrun); op 'sum' or 'max'. -> the tensor."""
    if dist.is_initialized():
        dist.all_reduce(_checked(tensor, device), op=dist.ReduceOp.SUM if op == 'sum' else dist.ReduceOp.MAX)
    return tensor


def all_reduce_grads(params, device):
    """Sum the gradients of `params` over ranks in one flat buffer (one collective, not one per
    tensor); a parameter without a gradient counts as zeros so every rank sends the same layout."""
    if not dist.is_initialized():
        return
    for q in params:
        q.grad = torch.zeros_like(q) if q.grad is None else q.grad
    flat = all_reduce(torch.cat([q.grad.flatten() for q in params]), device)
    for q, g in zip(params, flat.split([q.numel() for q in params])):
        q.grad.copy_(g.view_as(q))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj):
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
