"""update.py: the policy update around grpo.py's pure loss (method §6-7): which weights train (LoRA
adapters by default, or every language-model weight with train.py --tuning full), the KL reference
each one uses, the backward of one prompt's share of a step's loss, and the trained weights on disk.
Used by train.py.
Tested by: python -m pytest tests/test_update.py
"""
import copy, json, os
import torch

import grpo, lora, pipeline
import model as M

TUNINGS = ('lora', 'full')
META_FILE = 'train_meta.json'  # a full-tuning checkpoint's metadata (a LoRA adapter carries it inside)
TOWER = ('visual', 'vision', 'merger')  # path components of the vision tower and its merger: never trained


def in_tower(name):
    return any(t in part for part in name.split('.') for t in TOWER)


def weight_dtype(tuning):
    """Full tuning keeps fp32 weights even on GPU (None: the loader's choice, bf16 on GPU): a bf16 weight
    of ~1e-2 cannot absorb a 1e-5 step (bf16 resolution there is ~4e-5), the reason LoRA's A and B are
    fp32 (method §7) and the predecessors' FSDP kept fp32 master weights."""
    return torch.float32 if tuning == 'full' else None


def setup(net, tuning, lora_r, lora_alpha, init_adapter=None, reference=False):
    """Make `net` trainable the chosen way -> (the parameters the optimizer sees, the KL reference or None).
    lora: adapters on every LM linear (method §7), `init_adapter` (the stage-1 adapter) loaded into
      them; the reference is `net` itself (lora.reference_mode): the adapters off, or, when training
      continues `init_adapter`, that adapter kept frozen beside the trained one (lora.keep_reference), so
      the KL pulls toward the stage-1 policy stage 2 starts from, not toward the base. No copy of the model.
      A `net` already wrapped (parallel.load_sharded applies the adapters before sharding) is used as is.
    full: `init_adapter`, when given, is merged into the weights first, so the run starts from the same
      policy as a LoRA run continuing that adapter. Every language-model weight trains: every linear,
      the norms, the embeddings and lm_head (the predecessors' full fine-tuning, which froze only the
      vision tower); the tower and its merger stay frozen. The reference (only if `reference`) is a
      frozen copy of the starting weights: the second copy of the LM that LoRA avoids. The frozen tower
      is shared with it, not copied."""
    if tuning not in TUNINGS:
        raise ValueError(f'tuning must be one of {TUNINGS}, got {tuning!r}')
    if tuning == 'lora':
        if not lora.lora_modules(net):
            lora.apply_lora(net, r=lora_r, alpha=lora_alpha)
        if init_adapter:
            lora.load_lora(net, init_adapter)  # refuses an adapter of another rank / target set
            if reference:
                lora.keep_reference(net)
        return lora.lora_parameters(net), (net if reference else None)
    if init_adapter:
        meta = lora.read_lora(init_adapter)[1]
        lora.apply_lora(net, r=meta['r'], alpha=meta['alpha'])
        lora.load_lora(net, init_adapter)
        lora.fold_lora(net)
    net.requires_grad_(False)
    params = [p for name, p in net.named_parameters() if not in_tower(name)]
    for p in params:
        p.requires_grad_(True)
    ref = None
    if reference:
        tower = net.model.visual
        ref = copy.deepcopy(net, memo={id(tower): tower})  # (memo: the tower object itself is reused)
        for p in ref.parameters():
            p.requires_grad_(False)
    return params, ref


def policy_loss(net, rollouts, kept, adv, n_tok, micro_batch=8, clip_eps=0.2, ref=None, kl_coef=0.0,
                entropy_coef=0.0, every_row=False):
    """Backward of the step's loss share for one prompt: PPO-clip over its kept rollouts (rows `kept`
    of `rollouts`, advantages `adv` (G,)), weighted so that the sum over prompts and ranks is the
    token mean over every kept response token (n_tok of them, method §6). A zero-advantage row adds
    no gradient unless the KL term or the entropy bonus is on; then it is scored too. ref: the KL
    reference network (setup's). every_row (train.py --shard): zero-advantage rows are forwarded too (they
    add exactly 0), so every rank makes the same number of passes through the sharded layers, whose
    all-gathers must pair up. -> (loss share, [stats per micro-batch])."""
    dense = kl_coef > 0 or entropy_coef > 0 or every_row  # A = 0 rows forwarded: KL / entropy reach them, or --shard
    rows = kept if dense else kept[adv != 0]
    adv = adv if dense else adv[adv != 0]
    total, stats = 0.0, []
    for k in range(0, len(rows), micro_batch):
        batch = pipeline.update_batch(rollouts, rows[k:k + micro_batch])
        out = grpo.token_logprobs(net, batch, micro_batch=micro_batch, with_entropy=entropy_coef > 0)
        logp, entropy = out if entropy_coef > 0 else (out, None)                # (n, T) fp32 each
        ref_logp = None
        if kl_coef > 0:  # LoRA: the same network with its start's adapters (or none); full: the frozen copy
            with torch.no_grad(), lora.reference_mode(ref):
                ref_logp = grpo.token_logprobs(ref, batch, micro_batch=micro_batch)
        # one optimizer step per rollout batch: the old policy is the current one (ratio 1, §6)
        loss, st = grpo.grpo_loss(logp, logp.detach(), adv[k:k + micro_batch].to(logp.device),
                                  batch['response_mask'], clip_eps, ref_logp, kl_coef,
                                  entropy=entropy, entropy_coef=entropy_coef)
        share = batch['response_mask'].sum() / n_tok
        (loss * share).backward()
        total, stats = total + (loss * share).item(), stats + [st]
    return total, stats


def save_weights(net, proc, folder, tuning, meta):
    """The trained weights into a checkpoint folder, with `meta` (base, stage, step, image side,
    coordinate mode, the ablation flags). lora: adapter.safetensors, meta in its header. full: the
    whole model dir (save_pretrained, as stage 0 writes it, with the processor), meta as
    train_meta.json beside it; eval.py / predict.py --model take that folder and read both."""
    if tuning == 'lora':
        lora.save_lora(net, os.path.join(folder, 'adapter.safetensors'), meta)
        return
    net.save_pretrained(folder)
    proc.save_pretrained(folder)
    with open(os.path.join(folder, META_FILE), 'w') as f:
        json.dump(meta, f, indent=1)


def load_weights(net, folder, tuning):
    """--resume: the weights save_weights wrote, into `net` in place (the KL reference keeps the start)."""
    if tuning == 'lora':
        lora.load_lora(net, os.path.join(folder, 'adapter.safetensors'))
    else:
        net.load_state_dict(M.load_model(folder, dtype=next(net.parameters()).dtype).state_dict())
