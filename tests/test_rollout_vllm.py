"""Tests of rollout_vllm.py (--rollout vllm) against transformers' generate on the shipped sandbox base, on CPU:
greedy outputs equal pipeline.generate's without an adapter, with one and after the adapter changes; the
engine's log-probs of its sampled tokens equal grpo.token_logprobs (the update's); a row's sample depends on
(seed, prompt id, sample index) only; train.py --rollout vllm runs 2 steps, moves the adapter, reproducibly,
and under torchrun with --shard and a tensor-parallel engine (--vllm-tp 2);
eval.py --rollout vllm gives the greedy answers eval.py gives.
They need vLLM, which lives in its own environment (requirements-vllm.txt; `bash .ci/vllm-env` builds it):
  .venv-vllm/bin/python -m pytest -q -rs tests/test_rollout_vllm.py
In the main environment the file skips with one line saying so.
"""
import json, os, subprocess, sys
import pytest
import torch

pytest.importorskip('vllm', reason='vllm is not installed: these tests run in the vLLM environment '
                                   '(bash .ci/vllm-env builds it)')

import grpo, lora, pipeline, rollout_vllm
import model as M
from sandbox import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'sandbox', 'stage0')
SIZE, NEW = 112, 160  # the sandbox's input side and response budget


@pytest.fixture(scope='module')
def setup():
    """The sandbox base with a rank-8 adapter (B = 0 at first: the base itself) and one engine for the module."""
    torch.set_num_threads(1)
    net, proc = M.load_policy(BASE)
    lora.apply_lora(net, r=8, alpha=16)
    engine = rollout_vllm.Engine(BASE, net, memory=0.02, max_model_len=1024)
    return net, proc, M.load_template('stage2', BASE), engine


def new_adapter(net, seed):
    """Random non-zero B: a policy whose answers differ from the base's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(net):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def greedy_pair(setup, samples):
    net, proc, template, engine = setup
    hf = pipeline.generate(net, proc, samples, template, SIZE, max_new_tokens=NEW)
    vl = engine.generate(net, proc, samples, template, SIZE, max_new_tokens=NEW)
    return hf, vl


def test_greedy_equals_generate_without_and_with_an_adapter_and_after_an_update(setup):
    net, _, _, engine = setup
    samples = world.dataset('val', 12)
    answers = []
    for version in (None, 1, 2):  # the base (no adapter sent), then two successive adapter versions
        if version is not None:
            new_adapter(net, version)
            engine.sync(net)
        hf, vl = greedy_pair(setup, samples)
        for h, v in zip(hf, vl):
            assert torch.equal(h.prompt_ids, v.prompt_ids)
            assert h.responses[0][h.mask[0]].tolist() == v.responses[0][v.mask[0]].tolist(), (version, h.texts, v.texts)
            assert h.texts == v.texts
        answers.append([v.texts[0] for v in vl])
    assert answers[0] != answers[1] != answers[2]  # each adapter version really changed the answers


def test_engine_logprobs_equal_the_updates_logprobs(setup):
    """Sampled at T = 1, top-p 1: the engine's log-prob of each sampled token (vision tokens excluded, as in
    sampling) is what grpo.token_logprobs computes for it with the policy, within 1e-4."""
    net, proc, template, engine = setup
    new_adapter(net, 3)
    engine.sync(net)
    rolls, lps = engine.generate(net, proc, world.dataset('val', 4), template, SIZE, n=3, greedy=False,
                                 max_new_tokens=NEW, seed=5, logprobs=True)
    for r, lp in zip(rolls, lps):
        with torch.no_grad():
            ours = grpo.token_logprobs(net, pipeline.update_batch(r, list(range(3))))[:, len(r.prompt_ids):]  # (3, R)
        assert r.mask.sum() > 10 and torch.isfinite(lp).all()
        torch.testing.assert_close(ours.masked_fill(~r.mask, 0.0), lp, atol=1e-4, rtol=0)


def test_a_rows_sample_depends_on_seed_prompt_and_index_only(setup):
    net, proc, template, engine = setup
    samples = world.dataset('val', 4)
    def go(ss, keys, seed=0):
        rolls = engine.generate(net, proc, ss, template, SIZE, n=2, greedy=False, max_new_tokens=NEW, seed=seed,
                                keys=keys)
        return [t for r in rolls for t in r.texts]

    whole = go(samples, range(4))
    assert go(samples, range(4)) == whole  # the same seed: the same rollouts
    assert go(samples[:2], [0, 1]) + go(samples[2:], [2, 3]) == whole  # batching does not change them
    assert go(samples, range(4), seed=1) != whole
    assert len(set(whole)) > 1


def test_collapse_images_keeps_one_placeholder_per_image():
    ids = torch.tensor([1, 3, 6, 6, 6, 4, 9, 3, 6, 6, 4])
    assert rollout_vllm.collapse_images(ids, 6) == [1, 3, 6, 4, 9, 3, 6, 4]


def train(out, *extra, torchrun=False):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': ROOT}
    ranks = ['-m', 'torch.distributed.run', '--nproc_per_node', '2'] if torchrun else []
    p = subprocess.run([sys.executable, *ranks, os.path.join(ROOT, 'train.py'), '--stage', '1', '--model', BASE,
                        '--preset', 'sandbox', '--steps', '2', '--batch', '2', '--group', '4', '--rollouts', '4',
                        '--lora-r', '4', '--lora-alpha', '8', '--max-new-tokens', '60', '--eval-every', '0',
                        '--lr', '1e-3', '--threads', '1', '--rollout', 'vllm', '--vllm-memory', '0.02',
                        '--out', str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return [json.loads(x) for x in open(os.path.join(out, 'log.jsonl'))], \
        lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[0]


def test_train_two_steps_with_vllm_rollouts_moves_the_adapter_reproducibly(tmp_path):
    rec, ad = train(tmp_path / 'a')
    assert [r['step'] for r in rec] == [1, 2] and all(torch.isfinite(torch.tensor(r['loss'])) for r in rec)
    assert any(r['loss'] != 0 for r in rec) and rec[0]['clip_frac'] == 0.0  # on-policy: the first ratio is 1
    assert any(v.abs().sum() > 0 for k, v in ad.items() if k.endswith('lora_B'))  # B starts at 0: it moved
    rec2, ad2 = train(tmp_path / 'b')
    assert [r['loss'] for r in rec2] == [r['loss'] for r in rec] and all(torch.equal(ad[k], ad2[k]) for k in ad)


def test_train_under_torchrun_samples_from_a_tensor_parallel_engine(tmp_path):
    """2 ranks, the base sharded (--shard), one engine split over both (--vllm-tp 2, gloo on CPU)."""
    rec, ad = train(tmp_path, '--shard', '--vllm-tp', '2', torchrun=True)
    assert [r['step'] for r in rec] == [1, 2] and all(torch.isfinite(torch.tensor(r['loss'])) for r in rec)
    assert any(v.abs().sum() > 0 for k, v in ad.items() if k.endswith('lora_B'))


@pytest.mark.parametrize('flags, words', [(['--tuning', 'full'], '--rollout vllm serves the LoRA adapter'),
                                          (['--vllm-memory', '1.5'], '--vllm-memory 1.5: must be in (0, 1)'),
                                          (['--vllm-tp', '0'], '--vllm-tp 0: must be >= 1')])
def test_train_refuses_bad_vllm_flags_in_one_line(tmp_path, flags, words):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--stage', '1', '--rollout', 'vllm', *flags,
                        '--out', str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and last.startswith('[train] error: ') and words in last, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr


def test_eval_greedy_answers_are_the_same_with_vllm(tmp_path):
    def answers(rollout):
        out = tmp_path / rollout
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--model', BASE, '--limit', '6',
                            '--max-new-tokens', str(NEW), '--vis-n', '0', '--threads', '1', '--rollout', rollout,
                            '--vllm-memory', '0.02', '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=400, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return [json.loads(x)['answers'] for x in open(out / 'samples.jsonl')]
    assert answers('vllm') == answers('hf')
