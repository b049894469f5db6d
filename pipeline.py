"""pipeline.py: the StAR inference path, image + query -> masks (SPEC §1-4): resize for the MLLM,
prompt, generate (one call for N samples per query), parse, map coordinates back to the original
image, segment every object through the cached image embedding. Used by train.py (rollouts and
held-out gIoU) and eval.py.
Tested through tests/test_eval.py and tests/test_train.py (end to end).
"""
import numpy as np
import torch

import data
import model as M
import segment as S


@torch.no_grad()
def generate(net, proc, samples, template, image_size, n=1, greedy=True, temperature=1.0, top_p=1.0,
             max_new_tokens=2048):
    """-> (inputs (B, P), sequences (B*n, P+R), response mask (B*n, R) up to and incl. the first
    EOS, texts (B*n)). Rows j*n .. j*n+n-1 are the n samples of query j."""
    b = M.make_inputs(proc, [data.resize_for_model(s.image, image_size) for s in samples],
                      [M.build_prompt(s.query, template) for s in samples]).to(net.device)
    was_training = net.training
    net.eval()
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    seqs = net.generate(**b, num_return_sequences=n, max_new_tokens=max_new_tokens, **kw)
    net.train(was_training)
    resp = seqs[:, b['input_ids'].shape[1]:]                                         # (B*n, R)
    eos = torch.isin(resp, torch.tensor(net.generation_config.eos_token_id, device=resp.device))
    mask = (eos.int().cumsum(1) - eos.int()) == 0           # tokens before (and incl.) the 1st EOS
    pad = proc.tokenizer.pad_token_id
    texts = proc.batch_decode(resp.masked_fill(~mask, pad), skip_special_tokens=True)
    return b, seqs, mask, texts


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
    """-> (intersection, union) with ignore pixels removed (SPEC §12). Empty on empty: IoU 1."""
    if ignore is not None:
        pred, gt = pred & ~ignore, gt & ~ignore
    return int((pred & gt).sum()), int((pred | gt).sum())


def heldout_giou(net, proc, seg, samples, template, image_size, coord_mode, max_new_tokens, batch=32):
    """Greedy gIoU on held-out samples (the training-time check; eval.py does the full report)."""
    ious, example = [], None
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        _, _, _, texts = generate(net, proc, chunk, template, image_size, max_new_tokens=max_new_tokens)
        example = example or texts[0]
        for s, t in zip(chunk, texts):
            (_, masks, _), = segment_answers(seg, s, [t], image_size, coord_mode)
            inter, union = sample_iou(masks.any(0) if len(masks) else np.zeros_like(s.gt_mask), s.gt_mask, s.ignore)
            ious.append(1.0 if union == 0 else inter / union)
    return float(np.mean(ious)), example
