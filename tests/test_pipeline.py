"""Tests for pipeline.generate (method §6): rollouts are on-policy (the log-probs of the sampled tokens,
from the scores generate sampled them with, equal grpo.token_logprobs on the same sequences, although
the checkpoint's generation_config.json sets a repetition penalty and top-k; the vision placeholder
tokens are excluded from both distributions alike), and they do not depend on
how rows are chunked into generate calls. Real transformers classes (Qwen2.5-VL, Qwen3-VL) at small
widths with the real vocabulary size, built offline by tiny.build_config_dir.
Run: python -m pytest -q tests/test_pipeline.py
"""
import numpy as np
import pytest
import torch

import grpo, pipeline
from sandbox import tiny, world
import model as M

torch.set_num_threads(2)
NARROW = dict(text=dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=128),
              vision=dict(hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256))


@pytest.fixture(scope='module', params=['qwen2.5-vl-7b', 'qwen3-vl-8b'])
def policy(request, tmp_path_factory):
    path = tiny.build_config_dir(str(tmp_path_factory.mktemp(request.param)), request.param, layers=2,
                                 vision_layers=2, words=world.vocabulary(), **NARROW)
    torch.manual_seed(0)
    net = M.load_model(path, random_init=True)
    with torch.no_grad():  # sharper than the init's near-uniform logits, so that sampling has structure
        net.get_output_embeddings().weight.mul_(40)
    return net, M.load_processor(path)


def test_sampled_logprobs_equal_the_updates(policy, monkeypatch):
    net, proc = policy
    assert net.generation_config.repetition_penalty != 1.0 or net.generation_config.top_k not in (None, 0)
    seen = []  # the scores each sampling step received, and the tokens it chose
    call = pipeline.CounterSampler.__call__

    def spy(self, ids, scores):
        out = call(self, ids, scores)
        seen.append((scores.clone(), out.argmax(-1)))
        return out
    monkeypatch.setattr(pipeline.CounterSampler, '__call__', spy)
    samples = [world.sample('val', i) for i in (0, 1, 2)]  # queries of different lengths: left padding
    assert len({len(s.query) for s in samples}) > 1
    rolls = pipeline.generate(net, proc, samples, 'find: {question}', 64, n=2, greedy=False, max_new_tokens=6,
                              seed=1, keys=[10, 11, 12])
    banned = pipeline.vision_tokens(net)
    assert all((sc[:, banned] == float('-inf')).all() for sc, _ in seen)  # never sampled, renormalised away
    picked = torch.stack([tok for _, tok in seen], 1)                             # (rows, steps)
    sampled = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, tok[:, None])[:, 0] for sc, tok in seen], 1)
    for j, r in enumerate(rolls):
        rows = list(range(2))
        batch = pipeline.update_batch(r, rows)
        with torch.no_grad():
            logp = grpo.token_logprobs(net, batch)                               # (2, P + R)
        P = len(r.prompt_ids)
        for i in rows:
            n = int(r.mask[i].sum())
            assert torch.equal(r.responses[i, :n], picked[2 * j + i, :n])
            torch.testing.assert_close(logp[i, P:P + n], sampled[2 * j + i, :n], atol=2e-4, rtol=0)


def test_rollouts_do_not_depend_on_chunking_or_batching():
    net, proc = M.load_policy('sandbox/stage0')
    samples = [world.sample('val', i, ('P/F', 'C/KI')) for i in range(3)]
    kw = dict(n=4, greedy=False, max_new_tokens=40, seed=5, keys=[7, 8, 9])
    whole = pipeline.generate(net, proc, samples, 'find: {question}', 112, **kw)
    assert len({t for r in whole for t in r.texts}) > 3  # samples differ from each other
    for chunk in (1, 3, 5):
        part = pipeline.generate(net, proc, samples, 'find: {question}', 112, chunk=chunk, **kw)
        assert [r.texts for r in part] == [r.texts for r in whole]
    alone = pipeline.generate(net, proc, samples[1:2], 'find: {question}', 112, **{**kw, 'keys': [8]})
    assert alone[0].texts == whole[1].texts  # one prompt alone, as on another rank
    other = pipeline.generate(net, proc, samples, 'find: {question}', 112, **{**kw, 'seed': 6})
    assert [r.texts for r in other] != [r.texts for r in whole]
    with pytest.raises(ValueError, match='n must be 1'):
        pipeline.generate(net, proc, samples, 'find: {question}', 112, n=2)


def test_counter_sampler_follows_the_distribution():
    """Inverse-CDF sampling from one uniform per row: frequencies match softmax(logits / T) on the
    top-p nucleus (here p = 0.75 keeps the two most likely tokens of 0.5 / 0.3 / 0.2)."""
    logits = torch.log(torch.tensor([[0.3, 0.5, 0.2]])).expand(20000, 3)
    u = torch.as_tensor(np.random.default_rng(0).random((20000, 1)))
    for top_p, want in ((1.0, [0.3, 0.5, 0.2]), (0.75, [0.375, 0.625, 0.0])):
        out = pipeline.CounterSampler(u, prompt_len=5, top_p=top_p)(torch.zeros(20000, 5, dtype=torch.long), logits)
        freq = torch.bincount(out.argmax(-1), minlength=3).float() / 20000
        assert torch.allclose(freq, torch.tensor(want), atol=0.015), freq


def test_vision_placeholders_are_never_sampled():
    """A response holding <|image_pad|> would be read as an image slot by the update's forward (feature
    count mismatch). Even a policy that strongly prefers it never emits it, and the update runs."""
    net, proc = M.load_policy('sandbox/stage0')
    image_id = net.config.image_token_id
    boost = torch.zeros(net.config.get_text_config().vocab_size)
    boost[image_id] = 100.0  # now by far the most likely next token, in generation and in the update
    net.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + boost.to(out.dtype))
    s = world.sample('val', 0)
    r, = pipeline.generate(net, proc, [s], 'find: {question}', 112, n=4, greedy=False, max_new_tokens=8, seed=0)
    assert not torch.isin(r.responses, torch.tensor(pipeline.vision_tokens(net))).any()
    logp = grpo.token_logprobs(net, pipeline.update_batch(r, [0, 1]))
    assert torch.isfinite(logp).all() and (logp[:, -8:] <= 0).all()
