"""lora.py: low-rank adapters on the language model of a Qwen-VL policy (method §7), written from
scratch: wrap, switch off (the KL reference without a second model copy, method §6), merge, save, load.

Only the LM's linear layers get adapters; the vision tower, its merger, the embeddings and lm_head
stay frozen. B starts at zero, so the adapted model equals the base model at step 0.
Tested by: python -m pytest tests/test_lora.py
"""
import contextlib, json, math, os
import torch
from torch import nn

TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# Path components containing any of these are skipped. Qwen2.5-VL's vision blocks also have
# gate/up/down_proj (model.model.visual...), hence the exclusion by path, not only by leaf name.
EXCLUDE = ('visual', 'vision', 'merger', 'lm_head', 'embed')


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * alpha/r, with the base nn.Linear frozen.
    A and B are fp32 whatever the base dtype (method §7): on a bf16 base an update of lr 5e-6 on
    a weight of ~1e-2 is below bf16's resolution (~4e-5 there) and would round to no change."""

    def __init__(self, base, r, alpha, dropout=0.0, reference=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight  # (out, in); the adapter lives on the same device, in fp32
        self.lora_A = nn.Parameter(initial('lora_A', (r, base.in_features), w.device))
        self.lora_B = nn.Parameter(initial('lora_B', (base.out_features, r), w.device))
        # reference: a second, frozen adapter (the KL reference when training continues an adapter, method §6),
        # set by keep_reference; parameters, not buffers, so that --shard cuts them with the layer
        self.ref_A = nn.Parameter(torch.zeros_like(self.lora_A), requires_grad=False) if reference else None
        self.ref_B = nn.Parameter(torch.zeros_like(self.lora_B), requires_grad=False) if reference else None
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.enabled, self.as_reference = False, True, False

    def delta_weight(self):
        # (out, r) @ (r, in) in fp32, so merging a bf16 model rounds once, not twice
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x):
        y = self.base(x)
        A, B = (self.ref_A, self.ref_B) if self.as_reference else (self.lora_A, self.lora_B)
        if self.merged or not self.enabled or A is None:  # merged: the delta is already inside base.weight
            return y
        h = self.dropout(x).to(A.dtype) @ A.t()  # (..., r) in fp32, as peft does
        return y + (h @ B.t() * self.scaling).to(y.dtype)

    def extra_repr(self):
        return f'r={self.r}, alpha={self.alpha}, merged={self.merged}'


def initial(name, shape, device=None):
    """A new adapter's whole tensor: lora_A as nn.Linear initialises its weight, lora_B zeros (the adapted
    model starts as its base). parallel.load_sharded draws it the same way, then keeps its rank's part."""
    t = torch.zeros(shape, dtype=torch.float32, device=device)
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5)) if name == 'lora_A' else t


def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _wanted(name, targets, exclude):
    parts = name.split('.')
    return parts[-1] in targets and not any(e in p for p in parts for e in exclude)


def apply_lora(model, r=64, alpha=64, dropout=0.0, targets=TARGETS, exclude=EXCLUDE, reference=False):
    """Wrap every matching nn.Linear in place and freeze everything else. reference: each wrapper also
    gets a frozen second adapter (keep_reference fills it). -> (names of the wrapped modules, number of
    trainable parameters)."""
    if lora_modules(model):
        raise ValueError('model already has LoRA adapters; apply_lora twice would freeze them')
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _wanted(n, targets, exclude)]
    if not names:
        raise ValueError(f'no nn.Linear named {targets} outside {exclude} in {type(model).__name__}')
    for n in names:
        parent_name, _, leaf = n.rpartition('.')
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, reference))
    return names, sum(p.numel() for p in lora_parameters(model))


def lora_parameters(model):
    """The only parameters the optimizer (and DDP's gradient sync) should see."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def enable_checkpointing(model, reentrant=False):
    """Activation checkpointing on the decoder layers, LoRA-safe. Reentrant checkpointing drops
    the grads of a layer whose inputs need none (the base is frozen), so the LM's token embeddings
    must output a grad-requiring tensor; non-reentrant needs nothing. transformers hooks the
    vision patch embedding too, which makes every backward run through the frozen vision tower:
    drop its hooks and keep only the LM's."""
    on = getattr(model, 'activation_checkpointing_enable', None) or model.gradient_checkpointing_enable
    on({'use_reentrant': reentrant})
    model.disable_input_require_grads()
    if reentrant:
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        model._require_grads_hooks = [hook]  # where disable_input_require_grads looks for it


@contextlib.contextmanager
def lora_disabled(model):
    """Run the frozen base model (the KL reference, method §6) inside the block."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError('lora_disabled on a merged model: call unmerge_lora(model) first')
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def keep_reference(model):
    """Freeze a copy of the adapters as they are now as the reference (apply_lora(reference=True) made room
    for it; else it is added here): reference_mode then runs the model with it. Training that continues an
    adapter (stage 2 from stage 1) keeps its start so, and the KL pulls toward the policy it started from."""
    for _, m in lora_modules(model):
        if m.ref_A is None:
            m.ref_A, m.ref_B = (nn.Parameter(t.detach().clone(), requires_grad=False) for t in (m.lora_A, m.lora_B))
        else:
            m.ref_A.copy_(m.lora_A), m.ref_B.copy_(m.lora_B)


@contextlib.contextmanager
def reference_mode(model):
    """Run the KL reference inside the block (method §6): the frozen adapters keep_reference kept, or,
    where there are none, the base with adapters off (lora_disabled). No second copy of the model."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise RuntimeError('reference_mode on a merged model: call unmerge_lora(model) first')
    for m in mods:
        m.as_reference = True
    try:
        yield model
    finally:
        for m in mods:
            m.as_reference = False


@torch.no_grad()
def _fold(model, merge):
    todo = [m for _, m in lora_modules(model) if m.merged != merge]
    for m in todo:  # W += B@A*scale (merge) or W -= B@A*scale (unmerge), summed in fp32
        w = m.base.weight
        w.copy_((w.float() + (1 if merge else -1) * m.delta_weight()).to(w.dtype))
        m.merged = merge
    return len(todo)


def merge_lora(model):
    """Fold the adapters into the base weights (fast inference; never done by .eval()). Merged
    layers are skipped, so merging twice is a no-op. -> number of layers merged by this call."""
    return _fold(model, True)


def unmerge_lora(model):
    """Inverse of merge_lora, exact up to rounding; a no-op on unmerged layers. -> count."""
    return _fold(model, False)


def fold_lora(model):
    """Merge the adapters into the base weights and put the plain nn.Linear layers back: the model has
    its base's parameter names and no adapters again (full fine-tuning from a LoRA start, export).
    The unwrapped layers stay frozen, as the base weights were. -> number of layers merged."""
    merged = merge_lora(model)
    for name, module in lora_modules(model):
        parent, _, leaf = name.rpartition('.')
        setattr(model.get_submodule(parent), leaf, module.base)
    return merged


def lora_state_dict(model):
    """{'<module>.lora_A': (r, in), '<module>.lora_B': (out, r)}: the adapter and nothing else."""
    return {f'{n}.{k}': getattr(m, k).detach() for n, m in lora_modules(model) for k in ('lora_A', 'lora_B')}


def _config(model):
    mods = lora_modules(model)
    if not mods:
        raise ValueError('model has no LoRA adapters: call apply_lora first')
    return {'r': mods[0][1].r, 'alpha': mods[0][1].alpha, 'targets': [n for n, _ in mods]}


def save_lora(model, path, meta=None, state=None):
    """Write the adapter as safetensors; r, alpha, targets (and meta, JSON-encoded) go into the
    file's metadata. Temp file then os.replace, so a crash never leaves a half-written adapter.
    state: the tensors to write when the caller holds them (a sharded model's, gathered whole by
    parallel.full_adapter); default lora_state_dict(model)."""
    from safetensors.torch import save_file
    info = {**(meta or {}), **_config(model)}
    tensors = {k: v.cpu().contiguous() for k, v in (state or lora_state_dict(model)).items()}
    tmp = f'{path}.tmp{os.getpid()}'
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in info.items()})
    os.replace(tmp, path)


def read_lora(path):
    """-> (state dict, metadata with JSON values decoded). A missing, truncated or garbled file, or
    one holding NaN/inf, raises ValueError naming the file (one line for the scripts to print)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f'LoRA adapter {path}: no such file')
    try:
        with safe_open(path, framework='pt') as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f'LoRA adapter {path}: unreadable ({type(e).__name__}: {e}); truncated or not '
                         'a file written by train.py?') from None
    if not state or not all(k.endswith(('.lora_A', '.lora_B')) for k in state):
        raise ValueError(f'LoRA adapter {path}: holds no lora_A / lora_B tensors')
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'LoRA adapter {path}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}')
    return state, meta


def _modules(keys):
    """'<module>.lora_A' keys -> a short description: how many modules, which kinds, one example."""
    mods = sorted({k.rpartition('.')[0] for k in keys})
    kinds = sorted({m.rpartition('.')[2] for m in mods})
    return f'{len(mods)} modules ({", ".join(kinds)}), e.g. {mods[0]}' if mods else 'none'


@torch.no_grad()
def load_lora(model, path_or_state):
    """Copy a saved adapter into an already-wrapped model; refuse, naming the difference, an
    adapter of another rank, alpha or set of target modules. Returns the file's metadata."""
    is_file = isinstance(path_or_state, (str, os.PathLike))
    state, meta = read_lora(path_or_state) if is_file else (path_or_state, {})
    cfg, own = _config(model), lora_state_dict(model)
    for k in ('r', 'alpha'):
        if k in meta and meta[k] != cfg[k]:
            raise ValueError(f'LoRA {k} mismatch: adapter has {k}={meta[k]}, model has {k}={cfg[k]}')
    missing, extra = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or extra:
        raise ValueError(f'LoRA targets differ: only in the model: {_modules(missing)}; '
                         f'only in the adapter: {_modules(extra)}')
    for k, v in state.items():
        if v.shape != own[k].shape:
            rank = v.shape[0] if k.endswith('lora_A') else v.shape[-1]
            raise ValueError(f'LoRA rank mismatch at {k}: adapter {tuple(v.shape)} (rank {rank}), '
                             f'model {tuple(own[k].shape)} (rank {cfg["r"]})')
    if any(m.merged for _, m in lora_modules(model)):
        raise RuntimeError('load_lora into a merged model: call unmerge_lora(model) first')
    for k, v in state.items():  # own[k] shares storage with the parameter; copy_ casts dtype/device
        if hasattr(own[k], 'device_mesh'):  # sharded (--shard): this rank's part of the whole tensor
            from torch.distributed.tensor import distribute_tensor
            v = distribute_tensor(v.to(own[k].device_mesh.device_type), own[k].device_mesh, own[k].placements,
                                  src_data_rank=None)  # src_data_rank None: each rank cuts its own, no traffic
        own[k].copy_(v)
    return meta
