"""Tests for update.py and the tuning / entropy ablation flags (docs/method.md "Ablation flags"): --tuning full
trains every language-model weight and nothing in the vision tower, its KL reference is a frozen copy
(the tower shared), a LoRA start is merged into the same starting policy; the entropy bonus and the KL
reach zero-advantage rollouts; a full checkpoint round-trips, and eval / predict read what a run was
trained with (label-free prompt, input side). One end-to-end train.py run with every flag, then eval.py.
Run: python -m pytest -q tests/test_update.py
"""
import json, os, subprocess, sys
import numpy as np
import pytest
import torch
from torch import nn

import checkpoint, grpo, lora, pipeline, update
from sandbox import tiny, world
import model as M
import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'sandbox', 'stage0')
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def bare(tmp_path_factory):
    """A tiny base without prompt.txt: the prompt then comes from our named templates."""
    return tiny.build_tiny_policy(str(tmp_path_factory.mktemp('bare')), words=world.vocabulary(), layers=2, vision_depth=2)


@pytest.fixture(scope='module')
def rollouts():
    """Two prompts' rollouts from the sandbox base (4 sampled answers each)."""
    net, proc = M.load_policy(BASE)
    samples = world.dataset('train', 2, families=('explicit',))
    return pipeline.generate(net, proc, samples, M.load_template('stage1', BASE), 112, n=4, greedy=False,
                             max_new_tokens=30, seed=0, keys=[0, 1])


def lm_linears(net):
    return {n for n, m in net.named_modules() if isinstance(m, nn.Linear) and not update.in_tower(n)}


def test_full_tuning_trains_every_lm_weight_and_nothing_in_the_tower():
    net, _ = M.load_policy(BASE)
    before = {n for n, _ in net.named_parameters()}
    params, ref = update.setup(net, 'full', 16, 32)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert ref is None and {id(p) for p in params} == {id(p) for p in net.parameters() if p.requires_grad}
    linears = lm_linears(net)  # (lm_head may be tied to the embeddings: asked by module, not by parameter name)
    assert all(net.get_submodule(n).weight.requires_grad for n in linears) and len(linears) >= 7 * 4 + 1  # + lm_head
    assert not any('visual' in n for n in trainable) and all(not p.requires_grad for p in net.model.visual.parameters())
    assert any('embed_tokens' in n for n in trainable) and any('norm' in n for n in trainable)
    assert {n for n, _ in net.named_parameters()} == before and not lora.lora_modules(net)  # nothing wrapped
    net, _ = M.load_policy(BASE)
    params, ref = update.setup(net, 'lora', 16, 32, reference=True)  # the default: adapters only, no copy
    assert ref is net and {id(p) for p in params} == {id(p) for p in lora.lora_parameters(net)}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        f'{n}.lora_{k}' for n in linears if 'lm_head' not in n for k in 'AB'}


def test_kl_reference_is_a_frozen_copy_sharing_the_tower(rollouts):
    net, _ = M.load_policy(BASE)
    params, ref = update.setup(net, 'full', 16, 32, reference=True)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert ref is not net and ref.model.visual is net.model.visual
    for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q) and not q.requires_grad and (p.data_ptr() == q.data_ptr()) == ('visual' in n), n
    opt = torch.optim.AdamW(params, lr=1e-2)
    kept, adv, n_tok = torch.arange(4), torch.tensor([1.0, 1.0, 0.5, 0.5]), rollouts[0].mask.sum().float()
    _, stats = update.policy_loss(net, rollouts[0], kept, adv, n_tok, ref=ref, kl_coef=0.1)
    assert stats[0]['kl'] == 0  # the policy is still the reference
    opt.step()
    assert all(torch.equal(q, start[n]) for n, q in ref.named_parameters())  # the reference did not move
    assert any(not torch.equal(p, start[n]) for n, p in net.named_parameters())
    _, stats = update.policy_loss(net, rollouts[0], kept, adv, n_tok, ref=ref, kl_coef=0.1)
    with torch.no_grad():  # k3 of the moved policy against the frozen start, by hand
        batch = pipeline.update_batch(rollouts[0], kept)
        x = (grpo.token_logprobs(ref, batch) - grpo.token_logprobs(net, batch)).clamp(-10, 10)
        k3 = grpo.masked_mean(x.exp() - x - 1, batch['response_mask']).item()
    assert stats[0]['kl'] == pytest.approx(k3, rel=1e-4) and k3 > 0


def test_full_tuning_from_a_lora_start_is_the_same_policy(rollouts, tmp_path):
    net, _ = M.load_policy(BASE)
    lora.apply_lora(net, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for _, m in lora.lora_modules(net):
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05
    lora.save_lora(net, str(tmp_path / 'a.safetensors'), {'stage': 1})
    batch = pipeline.update_batch(rollouts[1], torch.arange(4))
    outs = []
    for tuning in ('lora', 'full'):
        net, _ = M.load_policy(BASE)
        update.setup(net, tuning, 4, 8, init_adapter=str(tmp_path / 'a.safetensors'))
        with torch.no_grad():
            outs.append(grpo.token_logprobs(net, batch))
    assert not lora.lora_modules(net) and torch.allclose(outs[0], outs[1], atol=1e-4)
    net, _ = M.load_policy(BASE)
    with torch.no_grad():
        assert not torch.allclose(outs[0], grpo.token_logprobs(net, batch), atol=1e-3)  # the adapter mattered


@pytest.mark.parametrize('kl, ent', [(0, 0), (0, 1e-3), (5e-3, 0)])
def test_zero_advantage_rollouts_carry_only_the_kl_and_entropy_terms(rollouts, kl, ent):
    net, _ = M.load_policy(BASE)
    params, ref = update.setup(net, 'full', 16, 32, reference=kl > 0)
    with torch.no_grad():
        net.lm_head.weight.add_(0.01 * torch.randn_like(net.lm_head.weight))  # the policy is off its reference
    loss, stats = update.policy_loss(net, rollouts[0], torch.arange(4), torch.zeros(4), rollouts[0].mask.sum().float(),
                                     ref=ref, kl_coef=kl, entropy_coef=ent)
    grads = [p.grad for p in params if p.grad is not None]
    assert (len(stats) == 0 and not grads) if kl == ent == 0 else (grads and any(g.abs().sum() > 0 for g in grads))
    if ent:
        assert loss == pytest.approx(-ent * stats[0]['entropy'], rel=1e-5) and stats[0]['entropy'] > 0


def test_full_checkpoint_round_trip_and_what_eval_reads(bare, tmp_path):
    net, proc = M.load_policy(bare)
    update.setup(net, 'full', 16, 32)
    with torch.no_grad():
        net.lm_head.weight.mul_(1.5)
    meta = dict(base=bare, stage=1, step=3, image_size=56, coord_mode='pixel', label=False, reward='star',
                tuning='full')
    update.save_weights(net, proc, str(tmp_path), 'full', meta)
    again, _ = M.load_policy(bare)
    update.setup(again, 'full', 16, 32)
    update.load_weights(again, str(tmp_path), 'full')
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))
    base, adapter, got = inference.resolve(str(tmp_path), None)
    assert (base, adapter, got) == (str(tmp_path), None, meta)
    pol = inference.load('eval', base, adapter, got, 'cpu')
    assert pol['template'] == M.TEMPLATES['eval-nolabel'] and pol['image_size'] == 56  # from train_meta.json
    for label, name in ((False, 'eval-nolabel'), (True, 'eval')):  # a LoRA adapter's metadata says the same
        net, _ = M.load_policy(bare)
        lora.apply_lora(net, r=4, alpha=8)
        lora.save_lora(net, str(tmp_path / f'{label}.safetensors'), dict(meta, label=label, tuning='lora'))
        base, adapter, got = inference.resolve(None, str(tmp_path / f'{label}.safetensors'))
        assert base == bare and inference.load('eval', base, adapter, got, 'cpu')['template'] == M.TEMPLATES[name]
    assert inference.load('eval', bare, None, {}, 'cpu')['template'] == M.TEMPLATES['eval']  # older adapters


ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': ROOT}
RL = ['--model', BASE, '--preset', 'sandbox', '--batch', '2', '--group', '4', '--rollouts', '4', '--max-new-tokens',
      '40', '--eval-every', '0', '--lr', '1e-3', '--stage', '1']
FLAGS = ['--tuning', 'full', '--no-label', '--reward', 'visionreasoner', '--kl-coef', '5e-3', '--entropy-coef', '1e-3']


def run(*args, script='train.py'):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def test_train_with_every_flag_then_eval_the_checkpoint(tmp_path):
    """One step with all the ablation flags: the reward is the predecessors' (at most 3 + 3 + 1), KL and
    entropy are logged, the checkpoint is a model dir with the flags in train_meta.json and in the saved
    config, the tower did not move; resumed to step 2 it equals a straight 2-step run; eval.py takes it."""
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run(*RL, *FLAGS, '--steps', 2, '--save-every', 1, '--out', full)
    run(*RL, *FLAGS, '--steps', 1, '--out', part)
    run(*RL, *FLAGS, '--steps', 2, '--save-every', 1, '--out', part, '--resume')
    rec = [json.loads(line) for line in open(os.path.join(full, 'log.jsonl'))]
    assert all(0 <= r['reward'] <= 7 and r['accuracy'] <= 3 and r['kl'] > -1e-6 and r['entropy'] > 0 for r in rec)
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith('t_')}  # noqa: E731
    assert [drop(r) for r in rec] == [drop(json.loads(line)) for line in open(os.path.join(part, 'log.jsonl'))]
    last = os.path.join(full, 'last')
    meta = json.load(open(os.path.join(last, update.META_FILE)))
    assert (meta['label'], meta['reward'], meta['tuning'], meta['step']) == (False, 'visionreasoner', 'full', 2)
    config = checkpoint.load_state(last)['config']
    assert (config['no_label'], config['reward'], config['tuning'], config['entropy_coef']) == (True, 'visionreasoner',
                                                                                                  'full', 1e-3)
    trained, start, resumed = (M.load_policy(d)[0] for d in (last, BASE, os.path.join(part, 'last')))
    moved = {n for (n, p), (_, q) in zip(trained.named_parameters(), start.named_parameters()) if not torch.equal(p, q)}
    assert moved and not any('visual' in n for n in moved) and any('mlp' in n for n in moved)
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), resumed.parameters()))
    out = str(tmp_path / 'eval')
    p = run('--model', last, '--limit', 2, '--vis-n', 0, '--max-new-tokens', 20, '--out', out, script='eval.py')
    assert os.path.isfile(os.path.join(out, 'summary.json')) and 'adapter none' in p.stdout



def _nucleus(scores, temperature, top_p):
    """The sampling distribution by a plain loop: softmax(scores / T) as float64, the most likely tokens kept
    until their mass reaches top_p. scores: (V,) as the sampler sees them. -> (p (V,), kept token ids)."""
    p = torch.softmax(scores.double() / temperature, -1).numpy()
    kept, mass = [], 0.0
    for v in np.argsort(-p, kind='stable'):
        if mass >= top_p:
            break
        kept.append(int(v))
        mass += p[v]
    return p, kept


def test_update_scores_the_distribution_the_rollouts_were_sampled_from(bare, monkeypatch):
    # --temperature 0.7 --top-p 0.9: the sampler draws from the processed distribution; the update must take the
    # log-probs of that same distribution, or the first update's ratio is not 1 and the gradient is another's.
    # A random tiny model: its spread-out next-token distributions make both flags matter.
    net, proc = M.load_policy(bare)
    lora.apply_lora(net, r=4, alpha=8)
    T, P, n = 0.7, 0.9, 4
    seen = []  # per decoding step: (rows,) log p of the drawn token, from generate's own (cached) forward
    sample = pipeline.CounterSampler.__call__

    def spy(self, input_ids, scores):
        out = sample(self, input_ids, scores)
        row = []
        for s, t in zip(scores.float(), out.argmax(-1).tolist()):
            p, kept = _nucleus(s, self.temperature, self.top_p)
            row.append(float(np.log(p[t] / p[kept].sum())) if t in kept else float('-inf'))
        seen.append(row)
        return out

    monkeypatch.setattr(pipeline.CounterSampler, '__call__', spy)
    roll, = pipeline.generate(net, proc, world.dataset('train', 1, families=('explicit',)),
                              M.load_template('stage1', bare), 56, n=n, greedy=False, temperature=T, top_p=P,
                              max_new_tokens=24, seed=0, keys=[0])
    R, resp, tok = roll.responses.shape[1], roll.mask, roll.responses                          # (n, R) each
    old = torch.tensor(seen).T[:, :R]                                                          # (n, R)
    batch = pipeline.update_batch(roll, torch.arange(n))
    with torch.no_grad():
        new = grpo.token_logprobs(net, batch)[:, -R:]                                          # (n, R)
        plain = grpo.token_logprobs(net, {**batch, 'temperature': 1.0, 'top_p': 1.0})[:, -R:]
    assert resp.sum() > 20 and torch.isfinite(old[resp]).all()
    ratio = (new - old)[resp].exp()
    assert (ratio - 1).abs().max() < 1e-4, (ratio - 1).abs().max()             # fp32 noise: cached vs full forward
    assert (plain - old)[resp].abs().max() > 0.05                              # the raw softmax is another distribution
    # the loss and its gradient equal those from log-probs of the processed distribution on full logits
    adv, n_tok = torch.tensor([1.0, -1.0, 0.5, -0.5]), resp.sum().float()
    params = lora.lora_parameters(net)
    update.policy_loss(net, roll, torch.arange(n), adv, n_tok)
    got = [q.grad.clone() for q in params]
    net.zero_grad()
    hidden = net.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'], use_cache=False,
                       image_grid_thw=batch['image_grid_thw'],
                       mm_token_type_ids=(batch['input_ids'] == net.config.image_token_id).int(),
                       mm_encoder_outputs={'image': grpo.select_images(roll.vision, [0] * n)}).last_hidden_state
    raw = net.lm_head(hidden[:, :-1]).float()[:, -R:].index_fill(-1, torch.tensor(roll.banned), float('-inf'))
    drop = torch.ones_like(raw, dtype=torch.bool)                                             # (n, R, V)
    for i, j in resp.nonzero().tolist():
        drop[i, j, _nucleus(raw[i, j].detach(), T, P)[1]] = False
    assert not drop[resp].gather(-1, tok[resp][:, None]).any()  # the drawn tokens are in their nucleus
    ref = torch.log_softmax((raw / T).masked_fill(drop, float('-inf')), -1).gather(-1, tok[..., None])[..., 0]
    zero = torch.zeros_like(old)
    loss, _ = grpo.grpo_loss(torch.where(resp, ref, zero), torch.where(resp, old, zero), adv, resp)
    loss.backward()
    assert loss.item() == pytest.approx(-(adv[:, None] * resp).sum().item() / n_tok.item(), abs=1e-4)  # ratio 1
    for g, q in zip(got, params):
        torch.testing.assert_close(g, q.grad, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize('tuning', ['lora', 'full'])
def test_stage2_kl_reference_is_the_stage1_policy(rollouts, tuning, tmp_path):
    # stage 2 continues a stage-1 adapter: its KL reference is that policy (KL 0 at the first step), not the base
    net, _ = M.load_policy(BASE)
    lora.apply_lora(net, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    for _, m in lora.lora_modules(net):  # a stage 1 that moved the policy well away from the (confident) base
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.5
    stage1 = str(tmp_path / 'stage1.safetensors')
    lora.save_lora(net, stage1, {'stage': 1})
    net, _ = M.load_policy(BASE)
    params, ref = update.setup(net, tuning, 4, 8, init_adapter=stage1, reference=True)
    kept, adv, n_tok = torch.arange(4), torch.tensor([1.0, -1.0, 0.5, -0.5]), rollouts[0].mask.sum().float()
    _, stats = update.policy_loss(net, rollouts[0], kept, adv, n_tok, ref=ref, kl_coef=0.1)
    assert stats[0]['kl'] == 0  # the first stage-2 step: the policy is its reference
    batch = pipeline.update_batch(rollouts[0], kept)
    k3 = lambda r, p: grpo.masked_mean((r - p).exp() - (r - p) - 1, batch['response_mask']).item()  # noqa: E731
    base, _ = M.load_policy(BASE)
    one, _ = M.load_policy(BASE, adapter=stage1)  # the stage-1 policy, loaded on its own
    with torch.no_grad():
        assert k3(grpo.token_logprobs(base, batch), grpo.token_logprobs(net, batch)) > 1e-3  # the base is far
    torch.optim.AdamW(params, lr=1e-2).step()
    _, stats = update.policy_loss(net, rollouts[0], kept, adv, n_tok, ref=ref, kl_coef=0.1)
    with torch.no_grad():  # after a step: k3 to the stage-1 policy, by hand
        expected = k3(grpo.token_logprobs(one, batch), grpo.token_logprobs(net, batch))
    assert stats[0]['kl'] == pytest.approx(expected, rel=1e-3) and expected > 0
