"""parallel.py: torch.distributed for train.py and eval.py under torchrun (one process per GPU, any
number of nodes): joining the process group, and the few collectives the scripts use, each checking
that its tensor is on this rank's device (NCCL only takes GPU tensors: a CPU scalar handed to it
stops the first step, while a CPU-only gloo test would never notice). With --shard, the base is
sharded over the ranks with PyTorch's FSDP2 (`shard`), loaded so without any rank holding it whole
(`load_sharded`), gathered once per generate call rather than per token (`gathered`), and the adapter and
optimizer state are gathered whole for checkpoints and cut back into shards on resume.
Tested by: python -m pytest tests/test_train.py -k "ddp or collective"; tests/test_shard.py
"""
import contextlib, glob, os, sys
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


def shard(net, device, fill=None):
    """Shard a Qwen-VL (LoRA applied, adapters loaded) with FSDP2 (torch.distributed.fsdp.fully_shard):
    one unit per decoder layer and per vision block (the classes transformers lists in
    _no_split_modules), then the vision tower's remainder, the model's remainder (embeddings, norm)
    and the root. Each unit's weights are all-gathered just before it runs and freed after, LoRA
    included; the LoRA gradients are reduce-scattered as they are made. lm_head stays whole on every
    rank: grpo.token_logprobs calls it chunk by chunk, and each call would all-gather it again.
    Gradients are SUMMED over ranks (train.py's loss is each rank's share of the global token mean),
    with a plain SUM collective, which gloo has too. fill: for a model whose parameters are on the meta
    device (load_sharded), fill(net) is called once each rank has allocated its shards. -> net, in place."""
    from torch.distributed.fsdp import fully_shard
    mesh, keep = _mesh(device), set(net.get_output_embeddings().parameters())
    blocks = [m for m in net.modules() if type(m).__name__ in net._no_split_modules]
    for m in blocks + [net.model.visual, net.model, net]:
        fully_shard(m, mesh=mesh, ignored_params=keep)
        m.set_gradient_divide_factor(1.0)         # sum, not the default mean over ranks
        m.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM: gloo has no PREMUL_SUM
    if fill is not None:  # to_empty allocates parameters and buffers: the buffers (real already) are put back
        buffers = {name: b.to(device) for name, b in net.named_buffers()}
        net.to_empty(device=device)
        net.tie_weights()  # to_empty gives tied parameters (lm_head = embeddings, small models) two tensors
        with torch.no_grad():
            for name, b in buffers.items():
                net.get_buffer(name).copy_(b)
        fill(net)
    # The root must be set up before any unit runs on its own (pipeline.generate calls the vision
    # tower first, grpo.token_logprobs calls net.model): FSDP would otherwise take that unit as root.
    net._get_fsdp_state()._lazy_init()
    if dist.get_rank() == 0:
        print(f'[shard] FSDP2 over {dist.get_world_size()} ranks, mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}: '
              f'{len(blocks)} blocks + 3 units, lm_head whole on every rank')
    return net


@contextlib.contextmanager
def _params_on_meta():
    """Parameters created inside land on the meta device (a shape, no memory); buffers stay real: the rotary
    frequencies are computed at construction and are in no checkpoint."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != 'meta':
            param = torch.nn.Parameter(param.to('meta'), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _local_index(p):
    """The part of a parameter's whole tensor this rank holds: a tuple of slices (() when not sharded)."""
    if not is_sharded(p):
        return ()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _checkpoint_index(net, path):
    """{parameter name: (safetensors file, key)} of checkpoint dir `path`, the keys renamed as transformers
    renames them when it loads (Qwen2/2.5-VL files say model.layers, the classes model.language_model.layers)."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    transforms = get_model_conversion_mapping(net)
    convert = [t for t in transforms if isinstance(t, WeightConverter)]
    if convert:  # a fused or split tensor (MoE experts): its slices are not slices of one file tensor
        raise ValueError(f'--shard loading: {type(net).__name__} checkpoints convert tensors on loading; not supported')
    names = {k: True for k, _ in net.named_parameters(remove_duplicate=False)}  # (what the renaming consults)
    where = {}
    for f in sorted(glob.glob(os.path.join(path, '*.safetensors'))):
        with safe_open(f, framework='pt') as h:
            for key in h.keys():
                where[rename_source_key(key, transforms, [], net.base_model_prefix, names)[0]] = (f, key)
    return where


def load_sharded(path, dtype=None, device='cpu', prepare=None, init=None, random_init=False):
    """--shard's loading: the model of checkpoint dir `path`, sharded (shard), without any rank ever holding it
    whole. Built with its parameters on the meta device (shapes only) and `prepare(net)` applied there (the
    LoRA wrappers); sharded; then each rank allocates only its shards on `device` and reads only its part of
    every tensor from the safetensors files, memory-mapped: the node's page cache holds a file once, each rank
    copies its slices. Host memory per rank: one tensor slice at a time; device memory: its shards and
    lm_head. Parameters the checkpoint lacks (the adapters) get init(leaf name, whole shape, device)
    (lora.initial), drawn whole in module order as an unsharded run draws them, then cut; random_init (smoke
    runs of a configuration): every weight drawn so, N(0, 0.02), norms 1, biases 0. dtype: as model.load_model.
    The whole-model way (model.load_model, then shard) holds the model on every rank: bench/memory.py."""
    import model as M
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig
    from transformers.initialization import no_init_weights
    M._check_dir(path, weights=not random_init)
    dtype = dtype or (torch.bfloat16 if str(device).startswith('cuda') else torch.float32)
    with no_init_weights(), _params_on_meta():
        net = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    net.tie_weights()  # (no_init_weights leaves lm_head untied)
    if os.path.isfile(os.path.join(path, 'generation_config.json')):
        net.generation_config = GenerationConfig.from_pretrained(path)
    where = {} if random_init else _checkpoint_index(net, path)
    if prepare is not None:  # (it may rename parameters, as LoRA's wrappers do: the index follows them)
        source = {id(p): where[name] for name, p in net.named_parameters() if name in where}
        prepare(net)
        where = {name: source[id(p)] for name, p in net.named_parameters() if id(p) in source}

    def fill(net):
        files = {}
        with torch.no_grad():
            for name, p in net.named_parameters():
                index, local = _local_index(p), p.to_local() if is_sharded(p) else p
                if name in where:
                    f, key = where[name]
                    h = files[f] = files.get(f) or safe_open(f, framework='pt')
                    local.copy_(h.get_slice(key)[index] if index else h.get_tensor(key))
                    continue
                leaf = name.rpartition('.')[2]
                if init is not None and leaf.startswith(('lora_', 'ref_')):
                    whole = init(leaf, p.shape, device)
                elif random_init:
                    whole = torch.empty(p.shape, dtype=p.dtype, device=device)
                    if p.dim() > 1:
                        whole.normal_(0, 0.02)
                    else:
                        whole.fill_(1.0 if 'norm' in name and leaf == 'weight' else 0.0)
                else:
                    raise ValueError(f'model checkpoint {path!r}: no weights for {name}')
                local.copy_(whole[index])
    return shard(net, device, fill)


@contextlib.contextmanager
def gathered(net):
    """Inside the block, a sharded model's (parallel.shard) weights stay whole on every rank: one all-gather
    per unit on entry, freed on exit. Around generate: FSDP2 re-gathers each unit after it runs (reshard after
    forward), i.e. the whole model at every decoding step (at 7B ~12 GB received per rank and token); gathered
    once, a 2,048-token rollout costs one gather of the model. The price is the whole model in each GPU's
    memory during generation (7B: 15 GB, fits an 80 GB GPU beside the KV cache); where it does not fit
    (32B: 64 GB) the units are left to gather per step and the README's vLLM engine with tensor parallelism
    is the way. A model that is not sharded passes through. Every rank must enter (collective)."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in net.modules() if isinstance(m, FSDPModule)]
    if not units or not _fits(net, units):
        yield net
        return
    for m in units:  # the root keeps its own setting (FSDP never reshards it after forward)
        if m is not net:
            m.set_reshard_after_forward(False, recurse=False)
    try:
        for m in units:
            m.unshard()
        yield net
    finally:
        for m in units:
            m.reshard()
            if m is not net:
                m.set_reshard_after_forward(True, recurse=False)


def _fits(net, units):
    """Whether the whole model fits in half of this GPU's free memory (the rest: KV cache, activations);
    on CPU (the tests) always. Every rank must get the same answer: the smallest free memory decides."""
    if next(net.parameters()).device.type != 'cuda':
        return True
    need = sum(p.numel() * p.element_size() for p in net.parameters())
    free = torch.tensor(float(torch.cuda.mem_get_info()[0]), device=next(net.parameters()).device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    ok = need <= free.item() / 2
    if not ok and dist.get_rank() == 0 and not getattr(net, '_warned_gather', False):
        net._warned_gather = True
        print(f'[shard] the whole model ({need / 2 ** 30:.0f} GiB) does not fit beside generation: each decoding step '
              f'gathers every layer again (slow; README "The real thing": the vLLM engine with tensor parallelism)')
    return ok


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
