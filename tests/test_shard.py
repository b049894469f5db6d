"""Tests of --shard (FSDP2, parallel.shard) on 2 CPU processes (gloo): the sharded model generates,
trains and checkpoints like the unsharded one.
  - the mechanics, on a small GRPO-like loop of this file's own (run under torchrun by the tests):
    2 sharded ranks == 1 plain process after 2 steps, with a prompt of zero advantage in step 0 (its rank
    still makes its passes, which add nothing); the checkpoint a sharded run writes resumes exactly;
  - README's multi-node command, as 2 one-process "nodes" on this machine (HSDP: replicated x sharded);
  - eval.py --shard == 1 process, with a rank that reruns a batch to keep in step;
  - train.py --shard end to end: 2 steps equal the 1-process run, resume is exact;
  - the real path: the sharded load (parallel.load_sharded) gives the whole model's weights with each rank holding
    its shards, and generate gathers each unit once per call (not per token) with unchanged rollouts.
gloo has every collective FSDP2 uses here (all-gather, reduce-scatter, all-reduce); parallel.shard asks for a
plain SUM, as NCCL's PREMUL_SUM (FSDP's default with a divide factor) is not in gloo.
Run: python -m pytest tests/test_shard.py (about 6 min on 2 cores)
"""
import json, os, subprocess, sys
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint, lora  # noqa: E402

BASE = os.path.join(ROOT, 'sandbox', 'stage0')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': ROOT}


def launch(*args, ranks=1, script=__file__):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--nproc_per_node', str(ranks)] if ranks > 1 else [])
    p = subprocess.run(cmd + [script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def adapter(out):
    return lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[0]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


# ----------------------------------------------------------------------------- the loop (run by the tests)
def loop(mode, out, steps):
    """Stage-1-like steps on the sandbox base: 2 prompts per step in all (split over the ranks), 4
    rollouts each, advantages from the response lengths; prompt 0 has zero advantage, so in step 0
    the rank holding it would have nothing to back-propagate. mode: plain | shard. Continues
    from out/last when it holds a checkpoint; saves there at the end; log.jsonl: one line per step."""
    import grpo, parallel, pipeline
    from sandbox import world
    import model as M
    torch.set_num_threads(1)
    _, rank, world_size, dev = parallel.init_distributed('cpu')
    torch.manual_seed(0)
    net, proc = M.load_model(BASE), M.load_processor(BASE)
    lora.apply_lora(net, r=4, alpha=8)
    ckpt, start = os.path.join(out, 'last'), 0
    if checkpoint.complete(ckpt):
        lora.load_lora(net, os.path.join(ckpt, 'adapter.safetensors'))  # before sharding, as train.py
    net.train()
    if mode == 'shard':
        lora.enable_checkpointing(net)  # as on GPU: FSDP's all-gathers run again in the recomputation
        parallel.shard(net, dev)
    params = lora.lora_parameters(net)
    opt = torch.optim.AdamW(params, lr=1e-3)
    if checkpoint.complete(ckpt):
        start, _ = checkpoint.restore(ckpt, opt)
    B = 2 // world_size
    for step in range(start, steps):
        ids = [(step * world_size + rank) * B + i for i in range(B)]
        rolls = pipeline.generate(net, proc, [world.sample('train', i) for i in ids], 'find: {question}', 112, n=4,
                                  greedy=False, max_new_tokens=20, seed=0, keys=ids)
        advs = [grpo.group_advantages(r.mask.sum(1).float()[None])[0] * (step > 0 or i % 2 == 1)
                for r, i in zip(rolls, ids)]
        n_tok = parallel.all_reduce(torch.tensor(float(sum(r.mask.sum() for r in rolls)), device=dev), dev)
        # as train.py: zero-advantage rows add no gradient and are skipped, except under --shard, where
        # every rank must make as many passes (FSDP's collectives pair up across ranks in call order)
        rows = [torch.arange(4)[(a != 0) | (mode == 'shard')] for a in advs]
        passes = sum(-(-len(r) // 2) for r in rows)                              # micro-batches of 2
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r, a, rs in zip(rolls, advs, rows):
            for k in range(0, len(rs), 2):
                b = pipeline.update_batch(r, rs[k:k + 2])
                logp = grpo.token_logprobs(net, b)
                loss, _ = grpo.grpo_loss(logp, logp.detach(), a[rs[k:k + 2]], b['response_mask'])
                (loss * b['response_mask'].sum() / n_tok).backward()
                total += (loss * b['response_mask'].sum() / n_tok).item()
        parallel.all_reduce_grads(params, dev)
        gnorm = parallel.full(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        loss = parallel.all_reduce(torch.tensor(total, device=dev), dev)
        mesh = list(params[0].device_mesh.shape) if parallel.is_sharded(params[0]) else []
        if rank == 0:
            with open(os.path.join(out, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(dict(step=step + 1, loss=loss.item(), grad_norm=gnorm.item(), passes=passes,
                                        mesh=mesh)) + '\n')
    state, opt_state = parallel.full_adapter(net), parallel.full_optimizer_state(opt)  # collective
    if rank == 0:
        checkpoint.save(ckpt, lambda d: lora.save_lora(net, os.path.join(d, 'adapter.safetensors'), state=state),
                        opt_state, steps, {}, 'find: {question}')
    parallel.finish()  # as train.py: no rank exits with the process group still up (an abort at teardown)


def real_path(out):
    """Loading and generation as --shard does them, against the whole model in the same process: the sharded
    load (parallel.load_sharded) gives the same weights while each rank holds its shards only; generate under
    --shard samples the same rollouts and all-gathers each unit once per call, not once per decoding step."""
    import torch.distributed as dist
    import parallel, pipeline
    from sandbox import world
    import model as M
    torch.set_num_threads(1)
    _, rank, _, dev = parallel.init_distributed('cpu')
    proc, res = M.load_processor(BASE), {}
    torch.manual_seed(0)
    whole = M.load_model(BASE)
    lora.apply_lora(whole, r=4, alpha=8, reference=True)
    torch.manual_seed(0)
    net = parallel.load_sharded(BASE, device=dev, init=lora.initial,
                                prepare=lambda n: lora.apply_lora(n, r=4, alpha=8, reference=True))
    mine = dict(whole.named_parameters())
    res['same_weights'] = all(torch.equal(parallel.full(p), mine[k]) for k, p in net.named_parameters())
    res['held'] = sum((p.to_local() if parallel.is_sharded(p) else p).numel() for p in net.parameters())
    res['whole'] = sum(p.numel() for p in whole.parameters())
    res['units'] = sum(1 for m in net.modules() if type(m).__name__.startswith('FSDP'))
    samples = [world.sample('val', i, ('P/F', 'C/KI')) for i in range(2)]
    kw = dict(n=2, greedy=False, seed=0, keys=[0, 1])
    run = lambda model, tokens: pipeline.generate(model, proc, samples, 'find: {question}', 112,  # noqa: E731
                                                  max_new_tokens=tokens, **kw)
    real, count = dist.all_gather_single, [0]

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)
    dist.all_gather_single = counting  # what FSDP2 all-gathers with
    for name, gather in (('once', True), ('per_step', False)):
        parallel._fits = lambda *_: gather  # noqa: B023 - False: as where the whole model does not fit
        for tokens in (8, 24):
            count[0] = 0
            rolls = run(net, tokens)
            res[f'{name}{tokens}'] = dict(gathers=count[0], steps=rolls[0].responses.shape[1],
                                          texts=[r.texts for r in rolls])
    dist.all_gather_single = real
    res['plain'] = [r.texts for r in run(whole, 24)]
    if rank == 0:
        with open(os.path.join(out, 'real.json'), 'w') as f:
            json.dump(res, f)


if __name__ == '__main__':
    if sys.argv[1] == 'real':
        real_path(sys.argv[2])
    else:
        loop(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.exit(0)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope='module')
def plain(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('plain'))
    launch('plain', out, 2)
    return out


def test_sharded_loop_equals_one_process_and_resumes_exactly(plain, tmp_path):
    two, part = str(tmp_path / 'two'), str(tmp_path / 'part')
    os.makedirs(two), os.makedirs(part)
    launch('shard', two, 2, ranks=2)
    a, b = adapter(plain), adapter(two)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith('lora_B'))
    # a sum of two fp32 gradients does not depend on the order: exact (train.py's test, with more
    # addends per element in another order, needs a tolerance)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = records(plain), records(two)
    assert ra[0]['passes'] == 2 and [r['passes'] for r in rb] == [2, 2]  # prompt 0 skipped / run by rank 0
    assert rb[0]['mesh'] == [2] and ra[0]['mesh'] == []  # one node: every layer cut in 2
    pick = lambda rec: [r[k] for r in rec for k in ('loss', 'grad_norm')]  # noqa: E731
    assert pick(ra) == pytest.approx(pick(rb), rel=1e-6)
    # a sharded run of 1 step, saved (whole tensors), then resumed sharded: the same second step
    launch('shard', part, 1, ranks=2)
    launch('shard', part, 2, ranks=2)
    assert records(part) == rb
    c = adapter(part)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_two_nodes_the_readme_command(plain, tmp_path):
    # README's multi-node command with 2 "nodes" of 1 process on this machine: torchrun's c10d rendezvous,
    # LOCAL_RANK 0 on both, LOCAL_WORLD_SIZE 1 < WORLD_SIZE 2 -> HSDP: replicated across the nodes
    # (the gradients all-reduced), sharded within each (here over 1 rank)
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = str(tmp_path)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend',
           'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}', '--rdzv_id', 'shardtest', __file__, 'shard', out, '2']
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert records(out)[0]['mesh'] == [2, 1]
    a, b = adapter(plain), adapter(out)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)


def test_sharded_eval_equals_one_process(plain, tmp_path):
    # 5 queries in batches of 2: rank 0 runs batches 0 and 2, rank 1 batch 1 and then batch 1 again,
    # unrecorded, so that both make the same generate calls
    flags = ['--model', BASE, '--adapter', os.path.join(plain, 'last', 'adapter.safetensors'), '--limit', 5,
             '--batch', 2, '--max-new-tokens', 30, '--image-size', 112, '--vis-n', 0, '--threads', 1]
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    launch(*flags, '--out', one, script=os.path.join(ROOT, 'eval.py'))
    launch(*flags, '--out', two, '--shard', ranks=2, script=os.path.join(ROOT, 'eval.py'))
    read = lambda d, f: [json.loads(line) for line in open(os.path.join(d, f))]  # noqa: E731
    assert read(one, 'samples.jsonl') == read(two, 'samples.jsonl')  # same greedy answers, in query order
    s1, s2 = (json.load(open(os.path.join(d, 'summary.json'))) for d in (one, two))
    for s in (s1, s2):
        s.pop('seconds'), s.pop('world_size')
    assert s1 == s2 and sorted(os.listdir(two)) == ['samples.jsonl', 'summary.json']


# ----------------------------------------------------------------------------- train.py --shard
# --threads 1: one thread per rank. The sandbox preset's 2 per rank would put 4 spinning compute threads on a
# 2-core machine, and every FSDP all-gather waits for the slowest of them (its steps ran ~2x slower here under load)
RL = ['--stage', 1, '--model', BASE, '--preset', 'sandbox', '--group', 4, '--rollouts', 4, '--lora-r', 4,
      '--lora-alpha', 8, '--max-new-tokens', 60, '--eval-every', 2, '--eval-n', 2, '--lr', 1e-3, '--save-every', 1,
      '--threads', 1]
TRAIN = os.path.join(ROOT, 'train.py')
drop_times = lambda rec: [{k: v for k, v in r.items() if not k.startswith('t_')} for r in rec]  # noqa: E731


def test_train_shard_equals_one_process_and_resumes_exactly(tmp_path):
    one, two, part = (str(tmp_path / d) for d in ('one', 'two', 'part'))
    launch(*RL, '--batch', 2, '--steps', 2, '--out', one, script=TRAIN)
    p = launch(*RL, '--batch', 1, '--steps', 2, '--out', two, '--shard', ranks=2, script=TRAIN)  # 2 x 1 prompt
    assert "[shard] FSDP2 over 2 ranks, mesh {'shard': 2}" in p.stdout
    r1, r2 = records(one), records(two)
    assert r2[1]['rest_flat_groups'] == 1  # rank 0's prompt of step 1 has zero advantage: its passes add 0
    # the same rollouts (per-prompt sampling streams), rewards and held-out check (run by both ranks)
    for k in ('reward', 'correct', 'format', 'accuracy', 'val_giou'):  # (resp_len is rank 0's share)
        assert [r.get(k) for r in r1] == [r.get(k) for r in r2], k
    a, b = adapter(one), adapter(two)
    # as tests/test_train.py's DDP test: Adam's first step is lr * g / |g|, so an element whose gradient
    # is ~0 can flip sign with the summation order; everything else agrees to float precision
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() <= 2e-3 + 1e-6
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith('lora_B'))
    # resume: a sharded run of 1 step, then --resume to 2, gives the uninterrupted sharded run exactly
    launch(*RL, '--batch', 1, '--steps', 1, '--out', part, '--shard', ranks=2, script=TRAIN)
    launch(*RL, '--batch', 1, '--steps', 2, '--out', part, '--shard', '--resume', ranks=2, script=TRAIN)
    assert drop_times(records(part)) == drop_times(r2)
    c = adapter(part)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_sharded_loading_and_generation_as_the_real_path_needs(tmp_path):
    # loading: the same weights, each rank holding about half; generation: the same rollouts, each FSDP unit
    # all-gathered once per generate call whatever the length, where per-step gathering costs a gather per token
    launch('real', str(tmp_path), ranks=2)
    r = json.load(open(tmp_path / 'real.json'))
    assert r['same_weights'] and r['held'] < 0.75 * r['whole']  # (lm_head / tied embeddings stay whole)
    for tokens in (8, 24):
        once, per_step = r[f'once{tokens}'], r[f'per_step{tokens}']
        assert once['texts'] == per_step['texts'] and once['steps'] == per_step['steps'] == tokens
    assert r['once24']['texts'] == r['plain']
    assert r['once8']['gathers'] == r['once24']['gathers'] <= r['units']  # one gather per unit, any length
    assert r['per_step24']['gathers'] - r['per_step8']['gathers'] >= 5 * 16  # per step: each LM unit, each token
