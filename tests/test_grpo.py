"""Tests for grpo.py: advantages and masked means vs numpy loops, the loss gradient vs its closed
form (ratio 1, clipping both ways, k3 KL, the entropy bonus), token/seq aggregation by hand, and
token_logprobs (and its entropies) on the tiny Qwen2.5-VL vs a full-batch log_softmax/gather reference.
Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_grpo.py
"""
import math
import numpy as np
import pytest
import torch
from PIL import Image
import grpo as G
import model as M
from sandbox.tiny import build_tiny_policy


def test_group_advantages_match_numpy():
    r = np.array([[1., 2., 3., 6.], [0.1, 0.1, 0.1, 0.1], [5., 0., 0., 0.]])
    adv = G.group_advantages(r)
    for b in range(3):
        ref = (r[b] - r[b].mean()) / (np.std(r[b], ddof=1) + 1e-6) if np.ptp(r[b]) else 0 * r[b]
        assert np.allclose(adv[b].numpy(), ref, atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))                   # constant group: exact zeros
    assert torch.equal(G.group_advantages([[3.0]]), torch.zeros(1, 1))  # G = 1: no NaN
    # by hand: [1,2,3] -> mean 2, std 1 -> [-1, 0, 1] / (1 + 1e-6)
    assert torch.allclose(G.group_advantages([[1., 2., 3.]]), torch.tensor([[-1., 0., 1.]]) / (1 + 1e-6))


def test_masked_mean_matches_loop():
    x = torch.tensor([[1., 2., float('nan')], [4., float('inf'), 6.], [7., 8., 9.]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]]).bool()
    assert G.masked_mean(x, m).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert G.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 5.0, 0.0])


def _closed_form(adv, mask, ratio, lo=0.8, hi=1.2):
    """d loss / d logp for the token mean: -A r / N where the unclipped branch is active, else 0."""
    a = adv[:, None].expand_as(ratio)
    active = ~(((ratio > hi) & (a > 0)) | ((ratio < lo) & (a < 0)))
    return torch.where(mask & active, -a * ratio, torch.zeros_like(ratio)) / mask.sum()


def test_loss_gradient_ratio_one_equals_policy_gradient():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_()
    adv, mask = torch.tensor([1.5, -0.5, 0.2]), torch.rand(3, 5) > 0.3
    loss, stats = G.grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    # ratio 1: grad = -mean over response tokens of A · ∇logp, ∇logp = identity on a leaf
    assert torch.allclose(logp.grad, -(adv[:, None] * mask) / mask.sum(), atol=1e-7)
    n = mask.sum(1).float()
    assert loss.item() == pytest.approx(-(adv * n).sum().item() / n.sum().item(), abs=1e-6)
    assert stats['clip_frac'] == 0 and stats['kl'] == 0
    assert stats['entropy'] == pytest.approx(-logp[mask].mean().item(), abs=1e-6)


def test_clipping_zeroes_gradient_only_in_the_right_direction():
    ratio = torch.tensor([[1.3, 1.25, 0.7, 1.1], [0.7, 0.75, 1.3, 0.9]])  # A = +1, then -1
    logp = ratio.log().clone().requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4, dtype=torch.bool)
    loss, stats = G.grpo_loss(logp, torch.zeros(2, 4), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, _closed_form(adv, mask, ratio), atol=1e-7)
    # A>0: ratios above 1.2 are clipped (grad 0), 0.7 is not; A<0: below 0.8 clipped, 1.3 is not
    assert (logp.grad[0, :2] == 0).all() and (logp.grad[0, 2:] != 0).all()
    assert (logp.grad[1, :2] == 0).all() and (logp.grad[1, 2:] != 0).all()
    assert stats['clip_frac'] == pytest.approx(4 / 8)


def test_kl_term():
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)
    base, _ = G.grpo_loss(logp, logp.detach(), adv, mask)
    same, st = G.grpo_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach(), kl_coef=0.1)
    assert same.item() == base.item() and st['kl'] == 0           # logp = ref: KL 0
    # by hand: x = ref - logp = 0.5 -> e^0.5 - 1.5; x = 20 clamps to 10 -> e^10 - 11
    ref = logp.detach() + torch.tensor([[0.5] * 3, [20.0] * 3])
    loss, st = G.grpo_loss(logp, logp.detach(), adv, mask, ref_logp=ref, kl_coef=0.1)
    k3 = (math.exp(0.5) - 1.5 + math.exp(10) - 11) / 2
    assert st['kl'] == pytest.approx(k3, rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.1 * k3, rel=1e-6)


def test_token_vs_seq_aggregation_by_hand():
    # ratio 1: per-token loss = -A. Lengths 1 and 3, A = [1, -2]:
    # token: (-1·1 + 2·3) / 4 = 5/4; seq: mean(-1, 2) = 1/2
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]]).bool()
    adv = torch.tensor([1.0, -2.0])
    assert G.grpo_loss(logp, logp, adv, mask, agg='token')[0].item() == pytest.approx(5 / 4)
    assert G.grpo_loss(logp, logp, adv, mask, agg='seq')[0].item() == pytest.approx(1 / 2)


def test_advantage_shapes_per_response_and_per_token():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]).bool()
    adv = torch.tensor([2.0, -1.0, 0.5])
    per_row, _ = G.grpo_loss(logp, logp.detach(), adv, mask)
    same, _ = G.grpo_loss(logp, logp.detach(), adv[:, None].expand(3, 4).clone(), mask)
    assert same.item() == pytest.approx(per_row.item())          # (B, T) constant per row == (B,)
    per_token = torch.arange(12.0).reshape(3, 4) - 5              # by hand: -sum(A_bt over mask) / 8
    loss, _ = G.grpo_loss(logp, logp.detach(), per_token, mask)
    assert loss.item() == pytest.approx(-per_token[mask].sum().item() / 8)
    loss.backward()
    assert torch.allclose(logp.grad, -(per_token * mask) / 8)
    for bad in (torch.zeros(3, 1), torch.zeros(4), torch.zeros(3, 4, 1), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match='advantages must be'):
            G.grpo_loss(logp, logp.detach(), bad, mask)


# ----------------------------------------------------------------- token_logprobs on the tiny model
@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    words = ['<think>a red cup</think><answer>[{"label": "cup"}]</answer>', 'find the cup']
    path = build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=words, layers=2,
                               vision_depth=2, image_size=84)
    return M.load_policy(path)


def test_token_logprobs_matches_full_batch_reference(tiny):
    net, proc = tiny
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (84, 56), (56, 84)]  # different patch counts per image: slicing matters
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    answers = ['<think>a</think><answer>[]</answer>', '<think>a red cup</think>',
               '<answer>[{"label": "cup"}]</answer>']
    batch = dict(M.make_inputs(proc, images, ['find the cup'] * 3, answers))
    ids = batch['input_ids']
    B, T = ids.shape
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([4, 9, 6]):       # the last n tokens of each row (rows are left-padded)
        resp[b, T - n:] = True
    batch['response_mask'] = resp
    with torch.no_grad():
        full = net(**{k: v for k, v in batch.items() if k != 'response_mask'}).logits  # (B, T, V)
        ref = torch.log_softmax(full.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        ref = torch.cat([torch.zeros(B, 1), ref], 1) * resp                              # (B, T)
        out_b = G.token_logprobs(net, batch, micro_batch=B)
        out_1 = G.token_logprobs(net, batch, micro_batch=1)
        out_2 = G.token_logprobs(net, batch, micro_batch=2)
        no_mm = G.token_logprobs(net, {k: v for k, v in batch.items() if k != 'mm_token_type_ids'})
        chunked = G.token_logprobs(net, batch, micro_batch=2, token_chunk=3)  # chunks cut inside rows
        # the vision tower run once per image, its output passed per row (the update's way)
        vision = net.model.get_image_features(batch['pixel_values'], batch['image_grid_thw'], return_dict=True)
        cached = G.token_logprobs(net, {**{k: v for k, v in batch.items() if k != 'pixel_values'},
                                        'vision': G.select_images(vision, range(B))}, micro_batch=2)
    assert out_b.dtype == torch.float32 and (out_b[~resp] == 0).all() and (out_b[resp] < 0).all()
    for out in (out_b, out_1, out_2, no_mm, chunked, cached):
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    grads = []
    for chunk in (512, 3):  # gradients reach the weights, the same through checkpointed chunks
        net.zero_grad()
        G.token_logprobs(net, batch, micro_batch=2, token_chunk=chunk).sum().backward()
        watched = (net.lm_head.weight, net.model.language_model.layers[0].mlp.up_proj.weight)
        grads.append([p.grad.clone() for p in watched])
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entropy_and_its_gradient_closed_form():
    """H = -Σ p log p over the whole vocabulary, from one chunk of hidden states; dH/dz = -p (log p + H),
    so dH/dh = W^T that (z = W h); and the bonus enters the loss as -coef × its token mean."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden, target = torch.randn(5, 6, requires_grad=True), torch.randint(0, 11, (5,))
    logp, ent = G._chunk_logprobs_entropy(head, hidden, target)
    z = hidden.detach() @ head.weight.detach().T
    p, lp = torch.softmax(z, -1), torch.log_softmax(z, -1)
    assert torch.allclose(ent, -(p * lp).sum(-1), atol=1e-6) and torch.allclose(logp, lp[range(5), target], atol=1e-6)
    ent.sum().backward()
    assert torch.allclose(hidden.grad, (-p * (lp + ent.detach()[:, None])) @ head.weight.detach(), atol=1e-5)
    keep = [v for v in range(11) if v not in (2, 5)]  # banned ids: the distribution over the other ids, no NaN
    hidden.grad = None
    _, ent = G._chunk_logprobs_entropy(head, hidden, target, torch.tensor([2, 5]))
    ent.sum().backward()
    p, lp = torch.softmax(z[:, keep], -1), torch.log_softmax(z[:, keep], -1)
    assert torch.allclose(ent, -(p * lp).sum(-1), atol=1e-6)
    assert torch.allclose(hidden.grad, (-p * (lp + ent.detach()[:, None])) @ head.weight.detach()[keep], atol=1e-5)
    logp = (-torch.rand(3, 4)).requires_grad_()
    entropy = torch.rand(3, 4, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0, 0.5]), torch.rand(3, 4) > 0.3
    base, _ = G.grpo_loss(logp, logp.detach(), adv, mask)
    loss, st = G.grpo_loss(logp, logp.detach(), adv, mask, entropy=entropy, entropy_coef=1e-3)
    loss.backward()
    assert loss.item() == pytest.approx(base.item() - 1e-3 * entropy[mask].mean().item(), abs=1e-7)
    assert torch.allclose(entropy.grad, -1e-3 * mask / mask.sum()) and st['entropy'] == pytest.approx(
        entropy[mask].mean().item())


def test_token_entropies_match_full_batch_reference(tiny):
    net, proc = tiny
    images = [Image.fromarray(np.full((56, 56, 3), 90 * i, np.uint8)) for i in range(2)]
    batch = dict(M.make_inputs(proc, images, ['find the cup'] * 2, ['<think>a red cup</think>', '<answer>[]</answer>']))
    T = batch['input_ids'].shape[1]
    batch['response_mask'] = torch.zeros(2, T, dtype=torch.bool)
    batch['response_mask'][:, T - 5:] = True
    with torch.no_grad():
        full = net(**{k: v for k, v in batch.items() if k != 'response_mask'}).logits.float()  # (B, T, V)
        lp = torch.log_softmax(full, -1)
        ref = torch.cat([torch.zeros(2, 1), -(lp.exp() * lp).sum(-1)[:, :-1]], 1) * batch['response_mask']
        logp, ent = G.token_logprobs(net, batch, micro_batch=1, with_entropy=True)
    assert torch.allclose(ent, ref, atol=1e-5) and (ent[batch['response_mask']] > 0).all()
    with torch.no_grad():  # the same log-probs (log_softmax then gather vs gather - logsumexp: rounding apart)
        assert torch.allclose(logp, G.token_logprobs(net, batch, micro_batch=1), atol=1e-5)
    grads = []
    for chunk in (512, 3):  # the entropy's gradient is the same through checkpointed chunks
        net.zero_grad()
        G.token_logprobs(net, batch, token_chunk=chunk, with_entropy=True)[1].sum().backward()
        grads.append(net.lm_head.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_select_images_repeats_per_row_outputs():
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    feats = (torch.zeros(2, 3), torch.ones(4, 3))
    out = G.select_images(BaseModelOutputWithPooling(pooler_output=feats), [1, 1, 0])
    assert [f.shape[0] for f in out.pooler_output] == [4, 4, 2] and out.pooler_output[0] is feats[1]
