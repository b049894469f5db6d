"""grpo.py: the GRPO pieces as StAR runs them (docs/method.md §6): group-normalised advantages, fp32 per-token
log-probs (and, for the optional entropy bonus, entropies) of the responses under a Qwen-VL policy, and the
PPO-clip loss with an optional k3 KL and entropy bonus.
Pure functions; the training loop that strings them together lives elsewhere.
Tested by: python -m pytest tests/test_grpo.py
"""
import torch


def group_advantages(rewards):
    """(B, G) rewards -> (B, G) advantages (r - mean) / (std + 1e-6), unbiased std per prompt group.
    A constant group (or G = 1) gives exact zeros, not rounding noise divided by 1e-6."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if r.shape[-1] > 1 else torch.zeros_like(mean)
    adv = (r - mean) / (std + 1e-6)
    constant = (r == r[..., :1]).all(-1, keepdim=True)
    return adv.masked_fill(constant, 0.0)


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is True (over all, or along dim); 0 where the mask is empty. Values
    outside the mask never leak in, even inf/nan."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    n = mask.sum() if dim is None else mask.sum(dim)
    return (x.sum() if dim is None else x.sum(dim)) / n.clamp_min(1).to(x.dtype)


def select_images(vision, index):
    """A Qwen-VL vision output (model.model.get_image_features(..., return_dict=True): per-image
    `pooler_output` tuple, Qwen3-VL's per-layer `deepstack_features`) -> the same type holding the
    images at `index`, in that order, repeats allowed. The vision tower runs once per prompt and its
    output is reused by all n rollout rows (method §6: the frozen tower, run n times, gives n copies)."""
    index = list(index)
    out = type(vision)(pooler_output=tuple(vision.pooler_output[i] for i in index))
    if getattr(vision, 'deepstack_features', None) is not None:
        out.deepstack_features = [tuple(layer[i] for i in index) for layer in vision.deepstack_features]
    return out


def _logits(head, hidden, target, banned=None, temperature=1.0, top_p=1.0):
    """(c, H) hidden states -> (c, V) fp32 logits of the chunk only, of the distribution the rollouts were
    sampled from (pipeline.CounterSampler, method §6): divided by `temperature`; the `banned` token ids (a
    LongTensor) at -inf, excluded as they were from sampling; with top_p < 1 every token outside the nucleus
    at -inf too (the most likely tokens until their mass reaches top_p, as the sampler picks them), except
    the (c,) `target`: the sampler's cached forward and this one round differently, and a sampled token
    that rounding moves across the nucleus edge would otherwise get log p = -inf. The nucleus is a set,
    not a function: no gradient flows through its choice, only through the renormalisation over it."""
    logits = head(hidden).float() / temperature
    if banned is not None:
        logits = logits.index_fill(-1, banned, float('-inf'))
    if top_p < 1.0:
        with torch.no_grad():
            probs, order = torch.softmax(logits, -1).sort(-1, descending=True)       # (c, V) each
            drop = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, (probs.cumsum(-1) - probs) >= top_p)
            drop.scatter_(-1, target[:, None], False)
        logits = logits.masked_fill(drop, float('-inf'))
    return logits


def _chunk_logprobs(head, hidden, target, banned=None, temperature=1.0, top_p=1.0):
    """(c, H) hidden states, (c,) targets -> (c,) fp32 log p(target)."""
    logits = _logits(head, hidden, target, banned, temperature, top_p)        # (c, V)
    return logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def _chunk_logprobs_entropy(head, hidden, target, banned=None, temperature=1.0, top_p=1.0):
    """As _chunk_logprobs, plus (c,) the entropy of the whole next-token distribution (banned ids
    excluded), H = -Σ_v p_v log p_v, from the same (c, V) logits."""
    logp = torch.log_softmax(_logits(head, hidden, target, banned, temperature, top_p), -1)  # (c, V), -inf: banned
    plogp = logp.exp() * logp.masked_fill(logp == float('-inf'), 0.0)          # 0 there, not 0 * -inf = NaN
    return logp.gather(-1, target[:, None]).squeeze(-1), -plogp.sum(-1)


def token_logprobs(model, batch, micro_batch=8, token_chunk=256, with_entropy=False):
    """(B, T) fp32: [b, t] = log p(input_ids[b,t] | input_ids[b,:t]) where response_mask is True
    (t >= 1), 0 elsewhere. One image per row: `pixel_values` (prod(image_grid_thw[i]) patches per
    image) or a precomputed vision output `vision` with one entry per row (select_images). Optional
    `banned`: token ids the sampling distribution excluded (pipeline.vision_tokens), excluded here too;
    `temperature` and `top_p`: the sampler's (default 1.0), so that the log-probs are those of the distribution
    the rollouts were drawn from (a policy gradient for another distribution otherwise).
    with_entropy: -> (log-probs, entropies), both (B, T), the second the entropy of the full
    next-token distribution at the same positions (the entropy bonus, method §6), from the same
    chunks: no (tokens, V) tensor is kept for it either.
    Memory (method §6): the LM's hidden states at the positions that predict response tokens go through
    lm_head `token_chunk` tokens at a time, and under autograd each chunk is checkpointed, so backward
    recomputes its (chunk, V) logits instead of keeping (tokens, V) fp32 logits alive; at V = 151,936
    and 2,048 tokens that is 1.2 GB per copy for the straightforward way."""
    from torch.utils.checkpoint import checkpoint
    ids, att, thw = batch['input_ids'], batch['attention_mask'], batch['image_grid_thw']
    B, T = ids.shape
    valid = batch['response_mask'].bool().clone()
    valid[:, 0] = False                                   # the first token has no prefix
    vision = batch.get('vision')
    starts = [0] + torch.cumsum(thw.prod(-1), 0).tolist()  # pixel_values row offset per image
    mm = batch.get('mm_token_type_ids')
    if mm is None:  # without it Qwen-VL silently falls back to 1-D positions: rebuild it
        mm = (ids == model.config.image_token_id).int()
    head = model.get_output_embeddings()
    banned = torch.as_tensor(batch['banned'], device=ids.device) if batch.get('banned') else None
    temperature, top_p = float(batch.get('temperature', 1.0)), float(batch.get('top_p', 1.0))
    chunk_fn = _chunk_logprobs_entropy if with_entropy else _chunk_logprobs
    rows, ents = [], []
    for s in range(0, B, micro_batch):
        e = min(s + micro_batch, B)
        out = torch.zeros(e - s, T, dtype=torch.float32, device=ids.device)
        if not valid[s:e].any():                          # nothing to score in these rows
            rows.append(out)
            ents.append(out)
            continue
        kw = dict(input_ids=ids[s:e], attention_mask=att[s:e], image_grid_thw=thw[s:e], mm_token_type_ids=mm[s:e],
                  use_cache=False)
        if vision is not None:
            kw['mm_encoder_outputs'] = {'image': select_images(vision, range(s, e))}
        else:
            kw['pixel_values'] = batch['pixel_values'][starts[s]:starts[e]]
        hidden = model.model(**kw).last_hidden_state                          # (n, T, H)
        pred = hidden[:, :-1][valid[s:e, 1:]]             # (k, H): the states at t-1 predict token t
        target = ids[s:e][valid[s:e]]                     # (k,) in the same row-major order
        parts = []
        for c in range(0, len(target), token_chunk):
            args = (head, pred[c:c + token_chunk], target[c:c + token_chunk], banned, temperature, top_p)
            parts.append(checkpoint(chunk_fn, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_fn(*args))
        if with_entropy:
            ents.append(out.masked_scatter(valid[s:e], torch.cat([h for _, h in parts])))
            parts = [lp for lp, _ in parts]
        rows.append(out.masked_scatter(valid[s:e], torch.cat(parts)))
    return (torch.cat(rows), torch.cat(ents)) if with_entropy else torch.cat(rows)


def grpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0, agg='token', entropy=None,
              entropy_coef=0.0):
    """PPO-clip surrogate (method §6) on (B, T) log-probs, plus kl_coef × k3 KL to ref_logp
    (exp(x) - x - 1, x = ref - logp clamped to ±10), minus entropy_coef × entropy, the (B, T) entropies
    of token_logprobs(with_entropy=True) (the predecessors' bonus; StAR uses none). adv: (B,) one
    advantage per response, broadcast over its tokens (GRPO), or (B, T) per token (as TRL and veRL pass
    them); anything else is refused.
    agg 'token': masked mean over all response tokens of the batch (StAR); 'seq': mean over
    sequences of per-sequence token means. Returns (loss, stats of floats)."""
    mask = mask.bool()
    if adv.shape == logp.shape:
        a = adv.to(logp.dtype)                                          # (B, T)
    elif adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        a = adv.to(logp.dtype)[:, None]                                 # (B, 1)
    else:
        raise ValueError(f'advantages must be (B,) = ({logp.shape[0]},) or (B, T) = {tuple(logp.shape)}, '
                         f'got {tuple(adv.shape)}')
    ratio = torch.exp(torch.where(mask, logp - old_logp, torch.zeros_like(logp)))  # (B, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * a, clipped * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        x = torch.where(mask, ref_logp - logp, torch.zeros_like(logp)).clamp(-10, 10)
        kl = torch.exp(x) - x - 1
        per_token = per_token + kl_coef * kl
    if entropy is not None:
        per_token = per_token - entropy_coef * torch.where(mask, entropy, torch.zeros_like(entropy))
    if agg == 'token':
        loss = masked_mean(per_token, mask)
    elif agg == 'seq':
        loss = masked_mean(per_token, mask, dim=1).mean()
    else:
        raise ValueError(f"agg must be 'token' or 'seq', got {agg!r}")
    with torch.no_grad():  # clipped = the min picked the flat, clipped branch (zero gradient)
        is_clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        stats = dict(clip_frac=masked_mean(is_clipped.float(), mask).item(),
                     kl=masked_mean(kl, mask).item(),
                     entropy=masked_mean(entropy if entropy is not None else -logp.float(), mask).item(),
                     mean_adv=masked_mean(a.float().expand_as(logp), mask).item())
    return loss, stats
