"""parallel.py: torch.distributed for train.py and eval.py under torchrun (one process per GPU, any
number of nodes): joining the process group, and the few collectives the scripts use, each checking
that its tensor is on this rank's device (NCCL only takes GPU tensors: a CPU scalar handed to it
stops the first step, while a CPU-only gloo test would never notice). With --shard, the base is
sharded over the ranks with PyTorch's FSDP2 (`shard`), and the adapter and optimizer state are
gathered whole for checkpoints and cut back into shards on resume.
Tested by: python -m pytest tests/test_train.py -k "ddp or collective"; tests/test_shard.py
"""
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def init_distributed(device, shard=False, tool='train'):
    """Under torchrun: join the process group (nccl on GPU, gloo on CPU) and take the GPU of this
    process's LOCAL rank (several nodes: RANK is global, LOCAL_RANK counts within the node).
    -> (ddp, rank, world_size, device); outside torchrun (False, 0, 1, device), or with `shard`
    (the script's --shard) one line naming the flag."""
    if 'RANK' not in os.environ:
        if shard:
            sys.exit(f'[{tool}] error: --shard needs torchrun, one process per GPU (README "More than one GPU")')
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
    tensor); a parameter without a gradient counts as zeros so every rank sends the same layout.
    Sharded parameters (--shard) are left out: FSDP has already reduced their gradients."""
    params = [q for q in params if not isinstance(q, DTensor)]
    if not dist.is_initialized() or not params:
        return
    for q in params:
        q.grad = torch.zeros_like(q) if q.grad is None else q.grad
    flat = all_reduce(torch.cat([q.grad.flatten() for q in params]), device)
    for q, g in zip(params, flat.split([q.numel() for q in params])):
        q.grad.copy_(g.view_as(q))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish():
    """End of a torchrun script: wait for every rank, then tear the process group down while Python is
    still whole. Left to the interpreter's exit, gloo's worker threads can still hold a finished
    collective's tensors (FSDP2 issues them asynchronously); releasing one then needs the GIL of an
    interpreter being torn down and the rank aborts: "terminate called without an active exception"."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's picklable `obj` on every rank (obj itself outside torchrun)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] outside torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- --shard: FSDP2
def _mesh(device):
    """One node: a 1-D mesh, every layer sharded over all ranks. Several nodes (torchrun's
    LOCAL_WORLD_SIZE < WORLD_SIZE): HSDP, sharded within the node and replicated across nodes, so the
    per-token all-gathers of generation stay on the node's fast links."""
    from torch.distributed.device_mesh import init_device_mesh
    world, local = dist.get_world_size(), int(os.environ.get('LOCAL_WORLD_SIZE', dist.get_world_size()))
    kind = torch.device(device).type
    if local < world and world % local == 0:
        return init_device_mesh(kind, (world // local, local), mesh_dim_names=('replicate', 'shard'))
    return init_device_mesh(kind, (world,), mesh_dim_names=('shard',))


def shard(net, device):
    """Shard a Qwen-VL (LoRA applied, adapters loaded) with FSDP2 (torch.distributed.fsdp.fully_shard):
    one unit per decoder layer and per vision block (the classes transformers lists in
    _no_split_modules), then the vision tower's remainder, the model's remainder (embeddings, norm)
    and the root. Each unit's weights are all-gathered just before it runs and freed after, LoRA
    included; the LoRA gradients are reduce-scattered as they are made. lm_head stays whole on every
    rank: grpo.token_logprobs calls it chunk by chunk, and each call would all-gather it again.
    Gradients are SUMMED over ranks (train.py's loss is each rank's share of the global token mean),
    with a plain SUM collective, which gloo has too. -> net, in place."""
    from torch.distributed.fsdp import fully_shard
    mesh, keep = _mesh(device), set(net.get_output_embeddings().parameters())
    blocks = [m for m in net.modules() if type(m).__name__ in net._no_split_modules]
    for m in blocks + [net.model.visual, net.model, net]:
        fully_shard(m, mesh=mesh, ignored_params=keep)
        m.set_gradient_divide_factor(1.0)         # sum, not the default mean over ranks
        m.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM: gloo has no PREMUL_SUM
    # The root must be set up before any unit runs on its own (pipeline.generate calls the vision
    # tower first, grpo.token_logprobs calls net.model): FSDP would otherwise take that unit as root.
    net._get_fsdp_state()._lazy_init()
    if dist.get_rank() == 0:
        print(f'[shard] FSDP2 over {dist.get_world_size()} ranks, mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}: '
              f'{len(blocks)} blocks + 3 units, lm_head whole on every rank')
    return net


def is_sharded(t):
    return isinstance(t, DTensor)


def full(t):
    """A sharded tensor's whole value (an all-gather: every rank must call it), else t itself."""
    return t.full_tensor() if is_sharded(t) else t


def full_adapter(net):
    """{name: whole fp32 tensor on the CPU} of the LoRA adapter; collective under --shard."""
    import lora
    return {k: full(v).cpu() for k, v in lora.lora_state_dict(net).items()}


def full_optimizer_state(opt):
    """opt.state_dict() with every sharded tensor gathered whole, onto the CPU: the same layout a
    run without --shard saves, so either kind of run resumes from either kind of checkpoint."""
    sd = opt.state_dict()
    sd['state'] = {i: {k: full(v).cpu() for k, v in s.items()} for i, s in sd['state'].items()}
    return sd


def shard_optimizer_state(sd, opt):
    """The inverse, before opt.load_state_dict: each whole tensor of a saved optimizer state becomes
    this rank's shard, laid out as its parameter (no communication: every rank holds the file's
    values). A state of unsharded parameters is returned unchanged."""
    from torch.distributed.tensor import distribute_tensor
    params = [p for g in opt.param_groups for p in g['params']]
    for i, s in sd['state'].items():
        p = params[i]
        if is_sharded(p):
            s.update({k: distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                           src_data_rank=None)
                      for k, v in s.items() if torch.is_tensor(v) and v.shape == p.shape})
    return sd
