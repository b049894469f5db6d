"""End-to-end tests of train.py at the tiniest settings: one step of each stage, exact resume,
2-process DDP (gloo) == 1 process, and clear errors on bad input.
Stages 1-2 start from the shipped sandbox base (sandbox/stage0), so rollouts have varied rewards.
Run: python -m pytest tests/test_train.py
"""
import ast, errno, json, os, runpy, shutil, signal, subprocess, sys, time, types
import pytest
import torch

import lora
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'sandbox', 'stage0')
RL = ['--model', BASE, '--preset', 'sandbox', '--batch', '2', '--group', '4', '--rollouts', '4',
      '--lora-r', '4', '--lora-alpha', '8', '--max-new-tokens', '60', '--eval-every', '0', '--lr', '1e-3']


ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONPATH': ROOT}


def run(*args, torchrun=False, ok=True, script=('train.py',), env=None):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--nproc_per_node', '2'] if torchrun else [])
    p = subprocess.run(cmd + [os.path.join(ROOT, s) for s in script] + [*map(str, args)], cwd=ROOT,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert (p.returncode == 0) == ok, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def records(out):
    return [json.loads(l) for l in open(os.path.join(out, 'log.jsonl'))]


def adapter(out):
    return lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[0]


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
    """The uninterrupted reference run: stage 1, two steps."""
    out = str(tmp_path_factory.mktemp('s1_ref'))
    run('--stage', 1, *RL, '--steps', 2, '--save-every', 1, '--out', out)
    return out


def test_stage0_trains_the_base(tmp_path):
    out = str(tmp_path)
    run('--stage', 0, '--steps', 2, '--batch', 4, '--eval-every', 2, '--eval-n', 2, '--max-new-tokens', 8,
        '--out', out)
    rec = records(out)
    assert [r['step'] for r in rec] == [1, 2] and all(torch.isfinite(torch.tensor(r['loss'])) for r in rec)
    assert 0.0 <= rec[-1]['val_giou'] <= 1.0
    assert os.path.isfile(os.path.join(out, 'curves.png'))  # the loss curve, written at each save
    a, _ = M.load_policy(os.path.join(out, 'init'))
    b, _ = M.load_policy(os.path.join(out, 'last'))
    changed = [n for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(x, y)]
    assert any('visual' in n for n in changed) and any('language_model' in n for n in changed)


def test_stage0_attribute_heads_train_the_tower_and_resume_exactly(tmp_path):
    # --vision-steps trains the tower alone; --attr-coef keeps its colour + shape loss beside the
    # language loss, and the head is checkpointed, so a resumed run takes the same second step.
    S0 = ['--stage', 0, '--model', BASE, '--batch', 2, '--eval-every', 0, '--vision-steps', 2, '--attr-coef', 0.5]
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    run(*S0, '--steps', 2, '--save-every', 1, '--out', full)
    run(*S0, '--steps', 1, '--save-every', 1, '--out', part)
    run(*S0, '--steps', 2, '--save-every', 1, '--out', part, '--resume')
    rec = records(full)
    assert all(torch.isfinite(torch.tensor([r['loss'], r['attr_loss']])).all() for r in rec)
    assert [r['attr_loss'] for r in records(part)] == [r['attr_loss'] for r in rec]
    a, _ = M.load_policy(os.path.join(full, 'last'))
    b, _ = M.load_policy(os.path.join(part, 'last'))
    base, _ = M.load_policy(BASE)
    for (n, x), (_, y), (_, z) in zip(a.named_parameters(), b.named_parameters(), base.named_parameters()):
        assert torch.equal(x, y), n
    assert any(not torch.equal(x, z) for n, x in a.named_parameters() if 'visual' in n)


def test_stage1_changes_only_lora_and_logs_finite_numbers(two_steps):
    rec = records(two_steps)
    assert [r['step'] for r in rec] == [1, 2]
    for r in rec:
        for k in ('loss', 'reward', 'format', 'accuracy', 'correct', 'grad_norm', 'resp_len', 't_generate'):
            assert torch.isfinite(torch.tensor(float(r[k]))), k
        assert 0 <= r['reward'] <= 13 and 0 <= r['correct'] <= 1
    state = adapter(two_steps)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith('lora_B')), 'B never moved'
    net, _ = M.load_policy(BASE, adapter=os.path.join(two_steps, 'last', 'adapter.safetensors'))
    base, _ = M.load_policy(BASE)
    own = dict(net.named_parameters())
    for n, p in base.named_parameters():  # every base weight is untouched, wrapped or not
        q = own.get(n) if n in own else own[n.replace('.weight', '.base.weight').replace('.bias', '.base.bias')]
        assert torch.equal(p, q), n


def test_resume_reproduces_the_uninterrupted_run(two_steps, tmp_path):
    out = str(tmp_path)
    run('--stage', 1, *RL, '--steps', 1, '--save-every', 1, '--out', out)
    run('--stage', 1, *RL, '--steps', 2, '--save-every', 1, '--out', out, '--resume')
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith('t_')}
    assert [drop(r) for r in records(out)] == [drop(r) for r in records(two_steps)]
    ref, got = adapter(two_steps), adapter(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_ddp_two_processes_equal_one(tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    run('--stage', 1, *RL, '--steps', 1, '--out', one)
    rl = list(RL)
    rl[rl.index('--batch') + 1] = '1'   # 2 ranks x 1 prompt == 1 rank x 2 prompts
    run('--stage', 1, *rl, '--steps', 1, '--out', two, torchrun=True)
    assert [r['reward'] for r in records(one)] == [r['reward'] for r in records(two)]  # same rollouts
    a, b = adapter(one), adapter(two)
    # Adam's first step is lr * g / |g|: an element whose gradient is ~0 can flip sign with the
    # summation order of all_reduce. Everything else must agree to float precision.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-6).float().mean() < 1e-3 and diff.max() <= 2e-3 + 1e-6
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith('lora_B'))


def test_stage2_rest_continues_stage1(two_steps, tmp_path):
    out = str(tmp_path)
    init = os.path.join(two_steps, 'last', 'adapter.safetensors')
    rl = list(RL)
    rl[rl.index('--rollouts') + 1] = '8'  # REST: sample 8, keep 4
    run('--stage', 2, *rl, '--steps', 1, '--init-adapter', init, '--out', out)
    r = records(out)[0]
    assert 0 <= r['reward'] <= 14 and 'rest_any_success_all' in r
    assert r['rest_any_success_all'] >= r['rest_any_success_first_m']
    a, b = lora.read_lora(init)[0], adapter(out)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_collectives_only_see_device_tensors():
    """NCCL has no CPU path: a tensor made on the host and handed to a collective stops the first
    GPU step, and a gloo test cannot notice. (1) parallel refuses a tensor on another device; (2) every
    collective in train.py receives a tensor made right there with an explicit device= (the old token
    count was a name bound to torch.tensor(...) without one)."""
    import parallel
    with pytest.raises(RuntimeError, match='NCCL needs'):
        parallel._checked(torch.zeros(1), 'meta')
    tree = ast.parse(open(os.path.join(ROOT, 'train.py')).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ('all_reduce', 'all_gather', 'broadcast', 'reduce_scatter', 'reduce')]
    assert len(calls) >= 2, 'the step reduces a token count and a loss'
    for call in calls:
        arg = call.args[0]
        assert isinstance(arg, ast.Call) and ast.unparse(arg.func) in ('torch.tensor', 'torch.zeros', 'torch.full') \
            and any(k.arg == 'device' for k in arg.keywords), ast.unparse(call)


@pytest.mark.parametrize('fault, words', [('loss', 'non-finite loss/gradient at step 1'),
                                          ('weights', 'non-finite weights after step 1')])
def test_non_finite_loss_or_weights_on_one_rank_stops_every_rank(tmp_path, fault, words):
    t = time.time()
    p = run('train.py', '--stage', 1, *RL, '--batch', 1, '--steps', 2, '--out', str(tmp_path), torchrun=True, ok=False,
            script=('tests/nan_on_rank1.py',), env=dict(FAULT=fault))
    assert p.stderr.count(words) == 2 and time.time() - t < 240  # both ranks say it; no hang to a timeout
    assert not os.path.exists(os.path.join(tmp_path, 'last'))


def test_interrupted_save_and_resume_bookkeeping(two_steps, tmp_path):
    out = str(tmp_path)
    run('--stage', 1, *RL, '--steps', 1, '--save-every', 1, '--out', out)
    p = run('--stage', 1, *RL, '--steps', 1, '--out', out, ok=False)  # a finished run is not overwritten
    assert '--resume' in p.stderr and 'Traceback' not in p.stderr
    # a kill between the two renames of checkpoint.save: last.old and a complete last.tmp, no last
    os.replace(os.path.join(out, 'last'), os.path.join(out, 'last.old'))
    shutil.copytree(os.path.join(out, 'last.old'), os.path.join(out, 'last.tmp'))
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:  # a step logged after the last save
        f.write(json.dumps({'step': 2, 'reward': -1.0}) + '\n')
    p = run('--stage', 1, *RL, '--steps', 2, '--save-every', 1, '--out', out, '--resume', '--lr', '2e-3')
    assert 'restored it from' in p.stdout and 'at step 1' in p.stdout and '--lr 0.002 replaces' in p.stdout
    assert [r['step'] for r in records(out)] == [1, 2] and records(out)[1]['reward'] != -1.0
    p = run('--stage', 1, *RL, '--steps', 1, '--out', str(tmp_path / 'new'), '--resume', ok=False)
    assert 'no checkpoint' in p.stderr and len(p.stderr.strip().splitlines()) <= 3  # one line, nothing started
    assert not os.path.exists(tmp_path / 'new')
    p = run('--stage', 2, '--out', str(tmp_path / 'new'), '--resume', ok=False)  # the sandbox demo's stage 2:
    assert 'no checkpoint' in p.stderr and not os.path.exists(tmp_path / 'new')  # not stage 1 first
    state = os.path.join(out, 'last', 'trainer.pt')  # a damaged trainer state is one line, not a traceback
    open(state, 'wb').write(open(state, 'rb').read()[:200])
    p = run('--stage', 1, *RL, '--steps', 3, '--out', out, '--resume', ok=False)
    assert 'trainer.pt: unreadable' in p.stderr and 'Traceback' not in p.stderr


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = str(tmp_path)
    # SIGINT back to its default in the child: a job started in the background by a non-interactive shell
    # (nohup cmd &) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, 'train.py', '--stage', '1', *RL, '--steps', '5000', '--out', out],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = os.path.join(out, 'log.jsonl')
    while not (os.path.isfile(log) and open(log).read().count('\n') >= 1):
        time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()  # only if the signal was lost: the run would go on for 5,000 steps
    assert proc.returncode != 0 and 'Traceback' not in err and '--resume' in err.splitlines()[-1]
    done = lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[1]['step']
    assert done >= 1 and done == max(r['step'] for r in records(out))


@pytest.mark.parametrize('flags, words', [
    (['--steps', -3], '--steps -3: must be >= 1'), (['--batch', 0], '--batch 0'), (['--lora-r', 0], '--lora-r 0'),
    (['--temperature', 0], '--temperature 0'), (['--save-every', 0], '--save-every 0'),
    (['--rollouts', 2, '--group', 4], '--rollouts 2 < --group 4'), (['--top-p', 1.5], '--top-p 1.5'),
    (['--image-size', 13], '--image-size 13: must be a multiple of 28'), (['--out', 'README.md'], 'is a file'),
    (['--hard-below', 0.5], 'for --stage 2'), (['--hard-k', 0], '--hard-k 0: must be >= 1')])
def test_bad_flags_stop_before_any_work(flags, words):
    p = run('--stage', 1, '--model', BASE, *flags, ok=False)
    assert words in p.stderr and 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) <= 3


def test_bad_input_gives_one_clear_line(two_steps, tmp_path, monkeypatch, capsys):
    # in this process where nothing or only a processor loads (train_here: one '[train] error:' line, no
    # traceback); each its own --out, as a lock lasts until this process exits
    msg = train_here(monkeypatch, capsys, '--stage', 1, '--model', tmp_path / 'missing', '--out', tmp_path / 'b',
                     model_may_load=True)  # first: the calls below make any model load fail the test
    assert 'missing' in msg
    msg = train_here(monkeypatch, capsys, '--stage', 2, '--model', BASE, '--steps', 1, '--out', tmp_path / 'a')
    assert '--init-adapter' in msg
    rl = list(RL)
    rl[rl.index('--lora-r') + 1] = '8'    # the stage-1 adapter has rank 4
    p = run('--stage', 2, *rl, '--steps', 1, '--out', str(tmp_path),
            '--init-adapter', os.path.join(two_steps, 'last', 'adapter.safetensors'), ok=False)
    assert 'r=4' in p.stderr and 'Traceback' not in p.stderr
    assert 'vit_q' in train_here(monkeypatch, capsys, '--stage', 1, '--sam-type', 'vit_q')
    assert "'P/F,riddles'" in train_here(monkeypatch, capsys, '--stage', 2, '--families', 'P/F,riddles')
    shutil.copytree(two_steps, tmp_path / 'r4', ignore=shutil.ignore_patterns('*.tmp', '*.old'))
    p = run('--stage', 1, *rl, '--steps', 3, '--out', str(tmp_path / 'r4'), '--resume', ok=False)  # another rank
    assert '--lora-r 8 but the checkpoint' in p.stderr and 'trained with --lora-r 4' in p.stderr  # before it loads
    assert 'Traceback' not in p.stderr


def test_paper_preset_on_a_tiny_base_keeps_its_input_side(tmp_path):
    """The paper preset asks for 840 px; a base whose processor keeps 112² must train at 112."""
    out = str(tmp_path)
    run('--stage', 1, '--model', BASE, '--batch', 1, '--group', 2, '--rollouts', 2, '--lora-r', 4,
        '--lora-alpha', 8, '--max-new-tokens', 20, '--eval-every', 0, '--steps', 1, '--out', out)
    meta = lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[1]
    assert meta['image_size'] == 112


@pytest.mark.parametrize('kl', [0.0, 0.01])
def test_token_mean_counts_every_kept_rollout(kl, tmp_path, monkeypatch):
    """Method §6: the loss is a mean over EVERY response token of the kept rollouts, zero-advantage ones
    included; they are forwarded only when the KL term is on (else their gradient is exactly zero).
    Rewards [1, 2, 3] give advantages [-1, 0, 1]; a second prompt's rewards are constant. The loss is
    replaced by 1 per micro-batch, so the logged loss is the sum of the weights: forwarded tokens /
    all kept tokens (the old denominator dropped the zero-advantage rows and made it 1 always)."""
    import runpy
    import grpo, pipeline, rewards
    calls, seen = iter([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), []
    comps = dict(format=0.0, accuracy=0.0, non_repeat=1.0, correct=False)
    monkeypatch.setattr(rewards, 'score_group', lambda texts, *a, **k: [(r, comps) for r in next(calls)])
    real_loss = grpo.grpo_loss

    def unit_loss(logp, old, adv, mask, *a, **k):
        seen.append(int(mask.sum()))
        return logp.sum() * 0 + 1.0, real_loss(logp, old, adv, mask, *a, **k)[1]
    monkeypatch.setattr(grpo, 'grpo_loss', unit_loss)
    real_generate, kept = pipeline.generate, []  # the step's two prompts' Rollouts
    monkeypatch.setattr(pipeline, 'generate', lambda *a, **k: kept.extend(real_generate(*a, **k)) or kept[-2:])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train.py', '--stage', '1', *map(str, RL), '--group', '3', '--rollouts', '3',
                                      '--micro-batch', '1', '--kl-coef', str(kl), '--steps', '1',
                                      '--out', str(tmp_path)])
    runpy.run_path('train.py', run_name='__main__')
    all_kept = sum(int(r.mask.sum()) for r in kept)                        # both prompts, all 3 rows
    forwarded = int(kept[0].mask[[0, 2]].sum()) if kl == 0 else all_kept  # rewards 1 and 3: advantage != 0
    assert sum(seen) == forwarded and len(seen) == (2 if kl == 0 else 6)
    assert records(str(tmp_path))[0]['loss'] == pytest.approx(forwarded / all_kept, rel=1e-6)


# ------------------------------------------------------------------ faults: signals, one run per --out, resume checks
def popen_train(*args):
    """train.py in the background, SIGINT at its default (see the Ctrl-C test); -> the process."""
    return subprocess.Popen([sys.executable, 'train.py', *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_a_record(proc, out):
    log = os.path.join(out, 'log.jsonl')
    while not (os.path.isfile(log) and open(log).read().count('\n') >= 1):
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()


def same_run(a, b):
    """Two runs' records (times aside) and adapters are equal."""
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith('t_')}  # noqa: E731
    assert [drop(r) for r in records(a)] == [drop(r) for r in records(b)]
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_saves_and_resumes_to_the_uninterrupted_run(two_steps, tmp_path):
    """SLURM and Kubernetes send SIGTERM before preemption: the finished steps are saved, the run says how to
    continue (exit 143), and continuing gives the run that was never stopped."""
    out = str(tmp_path / 'run')
    proc = popen_train('--stage', 1, *RL, '--steps', 5000, '--save-every', 1000, '--out', out)
    wait_for_a_record(proc, out)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()  # only if the signal was lost
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in err, err[-3000:]
    assert 'SIGTERM: interrupted after step' in err and '--resume' in err.strip().splitlines()[-1]
    done = lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[1]['step']
    assert done >= 1 and not os.path.exists(os.path.join(out, 'train.lock'))
    ref = two_steps
    if done != 1:  # the signal landed after step 2: compare with a run of done + 1 steps
        ref = str(tmp_path / 'ref')
        run('--stage', 1, *RL, '--steps', done + 1, '--out', ref)
    run('--stage', 1, *RL, '--steps', done + 1, '--out', out, '--resume')  # --steps may change on resume
    same_run(out, ref)


def test_one_run_per_out_and_a_kill_before_the_first_checkpoint(two_steps, tmp_path):
    """A second trainer on a busy --out is refused, naming the holder. A run killed (-9) before its first
    checkpoint leaves a stale lock and log records: the next run takes the lock over and its log holds each
    step once, equal to a run that was never killed."""
    out = str(tmp_path / 'run')
    first = popen_train('--stage', 1, *RL, '--steps', 5000, '--save-every', 1000, '--out', out)
    try:
        wait_for_a_record(first, out)
        p = run('--stage', 1, *RL, '--steps', 1, '--out', out, ok=False)
        assert f'in use by another training run (PID {first.pid}' in p.stderr and 'Traceback' not in p.stderr
    finally:
        first.kill()  # SIGKILL: no save, no clean-up
        first.communicate()
    assert not os.path.exists(os.path.join(out, 'last')) and records(out)
    p = run('--stage', 1, *RL, '--steps', 2, '--save-every', 1, '--out', out)
    assert f'taking over the lock of a run that is gone (PID {first.pid}' in p.stdout
    assert 'that saved no checkpoint removed' in p.stdout
    same_run(out, two_steps)
    assert not os.path.exists(os.path.join(out, 'train.lock'))  # removed at exit


def train_here(monkeypatch, capsys, *argv, model_may_load=False):
    """train.py in this process -> its one-line error (SystemExit). Fails if a model loads first (unless allowed)."""
    if not model_may_load:
        for name in ('load_model', 'load_processor', 'load_policy'):
            monkeypatch.setattr(M, name, lambda *a, **k: pytest.fail('a model loaded before the check'))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train.py', *map(str, argv)])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        signal.signal(signal.SIGTERM, handler)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert msg.startswith('[train] error: ') and '\n' not in msg, msg
    return msg


@pytest.mark.parametrize('flags, words', [
    (['--lr', 'inf'], '--lr inf: must be a finite number'), (['--wd', 'inf'], '--wd inf: must be a finite'),
    (['--lora-alpha', 'inf'], '--lora-alpha inf'), (['--temperature', 'nan'], '--temperature nan: must be a finite'),
    (['--kl-coef', 'nan'], '--kl-coef nan'), (['--lr', 2], '--lr 2.0: must be <= 1'),
    (['--seed', -1], '--seed -1: must be >= 0'), (['--seed', 2 ** 70], 'must be <= 4,294,967,295'),
    (['--threads', '1e12'], "--threads: invalid int value: '1e12'"), (['--threads', 10 ** 12], 'must be <= 1,024'),
    (['--max-new-tokens', 10 ** 12], '--max-new-tokens 1000000000000: must be <= 32,768'),
    (['--batch', 10 ** 12], '--batch 1000000000000'), (['--rollouts', 10 ** 12], '--rollouts 1000000000000'),
    (['--eval-n', 10 ** 12], '--eval-n 1000000000000'), (['--stage', 0, '--guess-frac', 'nan'], '--guess-frac nan'),
    (['--stage', 0, '--guess-frac', 0.7, '--fact-frac', 0.5], 'must be at most 1 together'),
    (['--stage', 3], "--stage: invalid choice: 3")])
def test_every_flag_error_is_one_line_before_any_model(flags, words, tmp_path, monkeypatch, capsys):
    assert words in train_here(monkeypatch, capsys, '--stage', 1, '--model', BASE, *flags, '--out', tmp_path)


def test_help_lists_the_limits(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['train.py', '--help'])
    with pytest.raises(SystemExit):
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    text = ' '.join(capsys.readouterr().out.split())
    assert '--batch, --group, --rollouts, --micro-batch, --gen-chunk, --eval-n 4,096' in text and '--seed >= 0' in text


def test_resume_refuses_what_would_change_the_run(two_steps, tmp_path, monkeypatch, capsys):
    """The checkpoint knows its run: a flag that changes a step is refused, naming it and both values."""
    out = str(tmp_path / 'run')
    shutil.copytree(two_steps, out)
    for flags, words in [(['--seed', 1], '--resume with --seed 1 but the checkpoint'), (['--batch', 3], '--batch 2'),
                         (['--no-label'], '--no-label True'), (['--group', 2], '--group 4'),
                         (['--reward', 'visionreasoner'], 'trained with --reward star'),
                         (['--image-size', 224], '--image-size 112')]:
        assert words in train_here(monkeypatch, capsys, '--stage', 1, *RL, '--steps', 3, '--out', out, '--resume',
                                   *flags)
    msg = train_here(monkeypatch, capsys, '--stage', 2, *RL, '--init-adapter', 'none', '--out', out, '--resume')
    assert '--stage 2 but the checkpoint' in msg and 'trained with --stage 1' in msg
    os.remove(os.path.join(out, 'last', 'train_config.json'))  # a checkpoint from before the file: trainer.pt's
    assert '--seed 1' in train_here(monkeypatch, capsys, '--stage', 1, *RL, '--out', out, '--resume', '--seed', 1)


def test_incomplete_or_blocked_checkpoint_is_refused_not_restarted(two_steps, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'run')
    shutil.copytree(two_steps, out)
    os.remove(os.path.join(out, 'last', 'trainer.pt'))  # the adapter is there, its step and optimizer state not
    kept = open(os.path.join(out, 'last', 'adapter.safetensors'), 'rb').read()
    for resume in ([], ['--resume']):
        msg = train_here(monkeypatch, capsys, '--stage', 1, *RL, '--steps', 3, '--out', out, *resume)
        assert 'holds adapter.safetensors' in msg and 'but no trainer.pt' in msg
    assert open(os.path.join(out, 'last', 'adapter.safetensors'), 'rb').read() == kept
    shutil.rmtree(os.path.join(out, 'last'))
    open(os.path.join(out, 'last'), 'w').close()
    assert 'is a file, not a checkpoint folder' in train_here(monkeypatch, capsys, '--stage', 1, *RL, '--out', out,
                                                               '--resume')
    assert 'cannot write there' in train_here(monkeypatch, capsys, '--stage', 1, *RL, '--out',
                                              os.path.join(out, 'last', 'sub'))


def test_a_live_lock_is_refused_a_dead_one_on_this_host_taken(tmp_path):
    import socket
    import checkpoint
    lock = tmp_path / 'train.lock'
    lock.write_text(json.dumps(dict(pid=os.getppid(), host=socket.gethostname())))  # alive: pytest's parent
    with pytest.raises(RuntimeError, match=f'PID {os.getppid()} on {socket.gethostname()}'):
        checkpoint.lock(str(tmp_path))
    lock.write_text(json.dumps(dict(pid=os.getppid(), host='elsewhere')))  # another host cannot be checked
    with pytest.raises(RuntimeError, match='on elsewhere'):
        checkpoint.lock(str(tmp_path))
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    lock.write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname())))
    assert checkpoint.lock(str(tmp_path)) == str(lock) and json.loads(lock.read_text())['pid'] == os.getpid()
    checkpoint._unlock(str(lock), os.getpid())
    assert not lock.exists()


def test_corrupt_log_line_is_skipped_and_named_and_steps_may_grow(two_steps, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(two_steps, out)
    log = os.path.join(out, 'log.jsonl')
    lines = open(log).readlines()
    open(log, 'w').writelines(lines[:1] + ['{"step": 2, "loss": nan-garbage\n'] + lines[1:])
    p = run('--stage', 1, *RL, '--steps', 3, '--save-every', 1, '--out', out, '--resume')
    assert f'{log} line 2: not a JSON step record, skipped' in p.stdout
    rec = records(out)
    assert [r['step'] for r in rec] == [1, 2, 3] and rec[:2] == records(two_steps)


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'run')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: types.SimpleNamespace(total=10 ** 6, used=0, free=4096))
    msg = train_here(monkeypatch, capsys, '--stage', 1, *RL, '--steps', 2, '--out', out, model_may_load=True)
    assert f'--out {out}: 0 MiB free, a checkpoint needs about' in msg
    assert not os.path.exists(os.path.join(out, 'log.jsonl'))  # before the first step
    monkeypatch.undo()
    real, calls = torch.save, []

    def full(obj, f, *a, **k):  # the second save finds the disk full
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full)
    msg = train_here(monkeypatch, capsys, '--stage', 1, *RL, '--steps', 2, '--save-every', 1, '--out', out,
                     model_may_load=True)
    assert msg.startswith('[train] error: saving step 2: cannot write the checkpoint') and 'No space left' in msg
    assert lora.read_lora(os.path.join(out, 'last', 'adapter.safetensors'))[1]['step'] == 1  # the last one stays
    assert not os.path.exists(os.path.join(out, 'last.tmp'))  # the half-written copy is gone


def screened_in_process(init, samples, k, max_new_tokens):
    """The --hard-below screen rebuilt outside train.py: the stage-1 adapter on the base, K sampled
    rollouts per prompt (streams 2**40 + the prompt's id), stage-2 'correct' per rollout."""
    import pipeline, rewards, update
    import segment as S
    torch.set_num_threads(2)  # as train.py's sandbox preset: the same float sums, the same sampled tokens
    proc, net = M.load_processor(BASE), M.load_model(BASE, torch.float32, 'cpu')
    update.setup(net, 'lora', 4, 8, init)
    template = M.load_template(M.template_name('stage2', True), BASE)
    rolls = pipeline.generate(net, proc, samples, template, 112, n=k, greedy=False, max_new_tokens=max_new_tokens,
                              keys=[(1 << 40) + i for i in range(len(samples))])
    return [[bool(c['correct']) for _, c in rewards.score_group(r.texts, s, S.ColorSegmenter(), 2, (112, 112),
                                                                 M.default_coord_mode(net))]
            for r, s in zip(rolls, samples)]


def check_pool(out, below, screened):
    """hard_pool.json keeps exactly the screened prompts solved at a rate < below, and every step trained on
    pool prompts only."""
    with open(os.path.join(out, 'hard_pool.json')) as f:
        saved = json.load(f)
    prompts = [saved['prompts'][str(i)] for i in range(len(saved['prompts']))]
    assert len(prompts) == screened == saved['screened']
    assert saved['pool'] == [i for i, (_, ok) in enumerate(prompts) if sum(ok) / len(ok) < below]
    pool_ids = {prompts[i][0] for i in saved['pool']}
    rec = records(out)
    assert rec[0]['step'] == 0 and rec[0]['pool_size'] == len(saved['pool'])
    assert all(set(r['pool_prompts']) <= pool_ids for r in rec[1:]) and len(rec) > 1
    return prompts


def test_hard_below_screens_the_stage1_policy_and_trains_on_the_pool(two_steps, tmp_path):
    """World: 4 prompts screened with 4 rollouts each from the stage-1 adapter; the successes equal an
    in-process rebuild of the screen, the pool follows the rule, the steps draw from the pool."""
    out, init = str(tmp_path), os.path.join(two_steps, 'last', 'adapter.safetensors')
    rl = list(RL)
    rl[rl.index('--rollouts') + 1] = '8'
    p = run('--stage', 2, *rl, '--steps', 2, '--init-adapter', init, '--out', out,
            '--hard-below', 0.5, '--hard-k', 4, '--hard-pool', 3)  # 3 -> 4: whole steps of 2 prompts
    assert 'screened 4 prompts x 4 rollouts' in p.stdout
    prompts = check_pool(out, 0.5, 4)
    from sandbox import world
    samples = [world.sample('train', i, ('P/F', 'C/KI', 'C/R', 'C/MH')) for i in range(4)]
    assert [pid for pid, _ in prompts] == [s.id for s in samples]
    assert [ok for _, ok in prompts] == screened_in_process(init, samples, 4, 60)


def test_hard_below_on_a_data_folder(tmp_path):
    """--data: the screen covers at most the dataset (one epoch), the steps draw from its pool; a pool
    file screened with other settings is refused in one line, one with the same settings is reused."""
    from sandbox import world
    from PIL import Image
    folder = tmp_path / 'train'
    folder.mkdir()
    for i in range(3):  # world scenes as a ReasonSeg folder: jpg + a polygon (the target's box) per target
        s = world.sample('test', i, ('C/R', 'C/MH'))  # rarely solved by the base: a non-empty pool
        Image.fromarray(s.image).save(folder / f'{i}.jpg', quality=95)
        shapes = [{'label': 'target', 'shape_type': 'polygon',
                   'points': [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]} for x1, y1, x2, y2 in s.boxes.tolist()]
        with open(folder / f'{i}.json', 'w') as f:
            json.dump({'text': [s.query], 'is_sentence': False, 'shapes': shapes or [
                {'label': 'target', 'shape_type': 'polygon', 'points': [[0, 0], [9, 0], [9, 9]]}]}, f)
    out = str(tmp_path / 'run')
    flags = ['--stage', 2, *RL, '--steps', 2, '--init-adapter', 'none', '--data', folder, '--hard-k', 2,
             '--hard-pool', 50]
    p = run(*flags, '--hard-below', 1.0, '--out', out)
    assert 'screened 4 prompts x 2 rollouts' in p.stdout  # 3 items -> one epoch, rounded up to whole steps
    prompts = check_pool(out, 1.0, 4)
    assert {pid for pid, _ in prompts} == {f'reasonseg/train/{i}' for i in range(3)}
    other = str(tmp_path / 'other')
    os.makedirs(other)
    shutil.copy(os.path.join(out, 'hard_pool.json'), other)
    p = run(*flags, '--hard-below', 0.9, '--out', other, ok=False)
    assert 'hard_pool.json was screened with other settings' in p.stderr and 'Traceback' not in p.stderr
    p = run(*flags, '--hard-below', 1.0, '--out', other, '--steps', 1)
    assert 'screened' not in p.stdout and records(other)[0]['step'] == 1  # reused: no second screen
