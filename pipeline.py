"""pipeline.py: the StAR inference path, image + query -> masks (method §1-4): resize for the MLLM,
prompt, generate (one call for N samples per query), parse, map coordinates back to the original
image, segment every object through the cached image embedding. Used by train.py (rollouts and
held-out gIoU) and eval.py.
Tested through tests/test_eval.py and tests/test_train.py (end to end).
"""
from dataclasses import dataclass
import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import data, grpo, parallel
import model as M
import segment as S


@dataclass
class Rollouts:
    """The n answers sampled for one prompt (method §6), with what the update needs to score them."""
    prompt_ids: torch.Tensor      # (P,) the chat-formatted prompt, image placeholder tokens included
    image_grid_thw: torch.Tensor  # (1, 3) the image's patch grid
    vision: object                # the frozen vision tower's output for the image (grpo.select_images)
    responses: torch.Tensor       # (n, R) sampled token ids, padding after the first EOS
    mask: torch.Tensor            # (n, R) bool: the tokens up to and including the first EOS
    texts: list                   # n decoded responses
    banned: list                  # token ids the sampling distribution excludes (vision_tokens); the update too
    temperature: float = 1.0      # the sampler's temperature and nucleus: the update scores the same distribution
    top_p: float = 1.0


class CounterSampler(LogitsProcessor):
    """Sampling from softmax(logits / temperature), restricted to the top-p nucleus, with one uniform
    number per row and step drawn from the row's own counter-based stream (`uniforms`, (rows, steps)).
    Row i's tokens depend only on its stream and its own logits, never on which rows share the batch,
    so the same seed gives the same rollouts whatever the chunking or the number of ranks. Used under
    greedy decoding: it returns a score row that is 0 at the chosen token and -inf elsewhere."""

    def __init__(self, uniforms, prompt_len, temperature=1.0, top_p=1.0):
        self.uniforms, self.prompt_len, self.temperature, self.top_p = uniforms, prompt_len, temperature, top_p

    def __call__(self, input_ids, scores):
        u = self.uniforms[:, input_ids.shape[1] - self.prompt_len, None]             # (rows, 1)
        probs = torch.softmax(scores.float() / self.temperature, -1)                  # (rows, V)
        order = None
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p (at least one)
            probs, order = probs.sort(-1, descending=True)
            probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)
        token = pick if order is None else order.gather(-1, pick)
        return torch.full_like(scores, -float('inf')).scatter_(-1, token, 0.0)


def vision_tokens(net):
    """Ids of the image / video placeholders and vision brackets. A response holding one would be read as an
    image slot by the next forward (a feature-count mismatch), so the policy never emits them: sampling
    and the update's log-probs both renormalise over the other tokens (method §6)."""
    cfg = net.config
    return sorted({getattr(cfg, k) for k in ('image_token_id', 'video_token_id', 'vision_start_token_id',
                                             'vision_end_token_id') if getattr(cfg, k, None) is not None})


def row_uniforms(seed, keys, n, steps):
    """(len(keys) * n, steps) uniforms in [0, 1): row (key, k) is the stream of sample k of the prompt
    with global id `key`, a function of (seed, key, k) alone."""
    return np.stack([np.random.default_rng([seed, key, k]).random(steps) for key in keys for k in range(n)])


@torch.no_grad()
def generate(net, proc, samples, template, image_size, n=1, greedy=True, temperature=1.0, top_p=1.0,
             max_new_tokens=2048, seed=0, keys=None, chunk=None):
    """-> [Rollouts] per sample: n responses each (greedy: n must be 1). The vision tower runs once per
    image; `chunk` caps the rows (prompts x samples) per generate call, which bounds the KV cache
    (at 7B, 256 rows of 3,000 tokens hold ~45 GB); every call pads its prompts to the same width, so
    chunking changes no row's input. keys: each sample's global id for its sampling
    streams (default 0..B-1). Only temperature and top-p shape the sampling: whatever the checkpoint's
    generation_config.json adds (repetition penalty, top-k, ...) is set aside (method §6: on-policy).
    A sharded model (train.py / eval.py --shard) is gathered whole once for the call (parallel.gathered),
    not once per decoding step."""
    if greedy and n != 1:
        raise ValueError('greedy decoding gives one answer per query: n must be 1')
    with parallel.gathered(net):
        return _generate(net, proc, samples, template, image_size, n, greedy, temperature, top_p, max_new_tokens,
                         seed, list(range(len(samples))) if keys is None else list(keys), chunk)


def _generate(net, proc, samples, template, image_size, n, greedy, temperature, top_p, max_new_tokens, seed, keys,
              chunk):
    b = M.make_inputs(proc, [data.resize_for_model(s.image, image_size) for s in samples],
                      [M.build_prompt(s.query, template) for s in samples]).to(net.device)
    vision = net.model.get_image_features(b['pixel_values'], b['image_grid_thw'], return_dict=True)
    prompts = [ids[m.bool()] for ids, m in zip(b['input_ids'], b['attention_mask'])]  # unpadded (P_j,)
    rows = [j for j in range(len(samples)) for _ in range(n)]                        # prompt of each row
    uniforms = None if greedy else torch.as_tensor(row_uniforms(seed, keys, n, max_new_tokens), device=net.device)
    gc = net.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else proc.tokenizer.pad_token_id
    banned = vision_tokens(net)
    clean = GenerationConfig(eos_token_id=gc.eos_token_id, pad_token_id=pad, bos_token_id=gc.bos_token_id,
                             max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=banned)
    was_training, net.generation_config = net.training, clean
    net.eval()
    outs, width = [], max(len(q) for q in prompts)
    try:
        for c in range(0, len(rows), chunk or len(rows)):
            part = rows[c:c + (chunk or len(rows))]
            ids = torch.full((len(part), width), pad, dtype=torch.long, device=net.device)
            att = torch.zeros_like(ids)
            for i, j in enumerate(part):  # left padding: generation appends on the right
                ids[i, width - len(prompts[j]):], att[i, width - len(prompts[j]):] = prompts[j], 1
            sampler = [] if greedy else [CounterSampler(uniforms[c:c + len(part)], width, temperature, top_p)]
            seqs = net.generate(input_ids=ids, attention_mask=att, image_grid_thw=b['image_grid_thw'][part],
                                mm_token_type_ids=(ids == net.config.image_token_id).long(),
                                mm_encoder_outputs={'image': grpo.select_images(vision, part)},
                                logits_processor=LogitsProcessorList(sampler))
            outs.append(seqs[:, width:])                                             # (rows, R_c)
    finally:
        net.generation_config = gc
        net.train(was_training)
    longest = max(o.shape[1] for o in outs)
    resp = torch.cat([torch.nn.functional.pad(o, (0, longest - o.shape[1]), value=pad) for o in outs])  # (B*n, R)
    eos = torch.isin(resp, torch.tensor(gc.eos_token_id, device=resp.device))
    mask = (eos.int().cumsum(1) - eos.int()) == 0           # tokens before (and incl.) the 1st EOS
    texts = proc.batch_decode(resp.masked_fill(~mask, pad), skip_special_tokens=True)
    return [Rollouts(prompts[j], b['image_grid_thw'][j:j + 1], grpo.select_images(vision, [j]),
                     resp[j * n:(j + 1) * n], mask[j * n:(j + 1) * n], texts[j * n:(j + 1) * n], banned,
                     *((1.0, 1.0) if greedy else (temperature, top_p))) for j in range(len(samples))]


def update_batch(rollouts, rows):
    """The update's input for some rows of one prompt's Rollouts: prompt + response, one image per
    row passed as the cached vision output (the tower is frozen: running it n times gives n copies).
    -> dict for grpo.token_logprobs, (len(rows), P + R)."""
    k, P = len(rows), len(rollouts.prompt_ids)
    resp = rollouts.mask[rows]                                                           # (k, R)
    ids = torch.cat([rollouts.prompt_ids.expand(k, P), rollouts.responses[rows]], 1)
    att = torch.cat([torch.ones(k, P, dtype=torch.long, device=ids.device), resp.long()], 1)
    return dict(input_ids=ids, attention_mask=att, response_mask=torch.cat([torch.zeros_like(att[:, :P]), resp], 1),
                image_grid_thw=rollouts.image_grid_thw.expand(k, -1),
                vision=grpo.select_images(rollouts.vision, [0] * k),
                banned=rollouts.banned, temperature=rollouts.temperature, top_p=rollouts.top_p)


def segment_answers(seg, sample, texts, image_size, coord_mode, key=None):
    """The n answers to one query -> per answer (objects in original px, or None if unparsable;
    masks (K,H,W); scores (K,)). All objects of all answers go through one decoder batch, with the
    image embedding cached under `key` (default: the sample's id). image_size: side or (w, h)."""
    H, W = sample.image.shape[:2]
    wh = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    objs = M.place_answers(texts, (W, H), wh, coord_mode)
    masks, scores = S.segment(seg, sample.image, [o for os_ in objs for o in (os_ or [])],
                              key=sample.id if key is None else key)
    out, k = [], 0
    for os_ in objs:
        m = len(os_ or [])
        out.append((os_, masks[k:k + m], scores[k:k + m]))
        k += m
    return out


def sample_iou(pred, gt, ignore=None):
    """-> (intersection, union) with ignore pixels removed (method §12). Empty on empty: IoU 1."""
    if ignore is not None:
        pred, gt = pred & ~ignore, gt & ~ignore
    return int((pred & gt).sum()), int((pred | gt).sum())


def heldout_giou(net, proc, seg, samples, template, image_size, coord_mode, max_new_tokens, batch=32):
    """Greedy gIoU on held-out samples (the training-time check; eval.py does the full report)."""
    ious, example = [], None
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        texts = [t for r in generate(net, proc, chunk, template, image_size, max_new_tokens=max_new_tokens)
                 for t in r.texts]
        example = example or texts[0]
        for s, t in zip(chunk, texts):
            (_, masks, _), = segment_answers(seg, s, [t], image_size, coord_mode)
            inter, union = sample_iou(masks.any(0) if len(masks) else np.zeros_like(s.gt_mask), s.gt_mask, s.ignore)
            ious.append(1.0 if union == 0 else inter / union)
    return float(np.mean(ious)), example
