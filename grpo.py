"""grpo.py: the GRPO pieces as StAR runs them (SPEC §6): group-normalised advantages, fp32 per-token
log-probs of the responses under a Qwen-VL policy, and the PPO-clip loss with an optional k3 KL.
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


def token_logprobs(model, batch, micro_batch=8):
    """(B, T) fp32: [b, t] = log p(input_ids[b,t] | input_ids[b,:t]) where response_mask is True
    (t >= 1), 0 elsewhere. One image per row; rows are processed micro_batch at a time, each with
    its own slice of pixel_values (prod(image_grid_thw[i]) patches per image). Only the logits that
    predict response tokens are computed (a boolean logits_to_keep), and only they go to fp32."""
    ids, att, thw = batch['input_ids'], batch['attention_mask'], batch['image_grid_thw']
    B, T = ids.shape
    valid = batch['response_mask'].bool().clone()
    valid[:, 0] = False                                   # the first token has no prefix
    keep = torch.zeros_like(valid)
    keep[:, :-1] = valid[:, 1:]                           # logits at t-1 predict token t
    starts = [0] + torch.cumsum(thw.prod(-1), 0).tolist()  # pixel_values row offset per image
    mm = batch.get('mm_token_type_ids')
    if mm is None:  # without it Qwen-VL silently falls back to 1-D positions: rebuild it
        mm = (ids == model.config.image_token_id).int()
    rows = []
    for s in range(0, B, micro_batch):
        e = min(s + micro_batch, B)
        if not keep[s:e].any():                           # nothing to score in these rows
            rows.append(torch.zeros(e - s, T, dtype=torch.float32, device=ids.device))
            continue
        logits = model(input_ids=ids[s:e], attention_mask=att[s:e], image_grid_thw=thw[s:e],
                       pixel_values=batch['pixel_values'][starts[s]:starts[e]],
                       mm_token_type_ids=mm[s:e], logits_to_keep=keep[s:e], use_cache=False).logits
        target = ids[s:e][valid[s:e]]                     # (n,) same row-major order as keep
        lp = logits.gather(-1, target[:, None]).squeeze(-1).float() - torch.logsumexp(logits.float(), -1)
        rows.append(torch.zeros(e - s, T, dtype=torch.float32, device=ids.device)
                    .masked_scatter(valid[s:e], lp))
    return torch.cat(rows)


def grpo_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0, agg='token'):
    """PPO-clip surrogate (SPEC §6) on (B, T) log-probs with (B,) advantages broadcast over tokens,
    plus kl_coef × k3 KL to ref_logp (exp(x) - x - 1, x = ref - logp clamped to ±10).
    agg 'token': masked mean over all response tokens of the batch (StAR); 'seq': mean over
    sequences of per-sequence token means. Returns (loss, stats of floats)."""
    mask = mask.bool()
    a = adv.to(logp.dtype)[:, None]                                     # (B, 1)
    ratio = torch.exp(torch.where(mask, logp - old_logp, torch.zeros_like(logp)))  # (B, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * a, clipped * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        x = torch.where(mask, ref_logp - logp, torch.zeros_like(logp)).clamp(-10, 10)
        kl = torch.exp(x) - x - 1
        per_token = per_token + kl_coef * kl
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
                     entropy=-masked_mean(logp.float(), mask).item(),
                     mean_adv=adv.float().mean().item())
    return loss, stats
