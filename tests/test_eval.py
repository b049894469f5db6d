"""Tests for eval.py (method §10, §12): one query's scoring with teacher answers (exact masks from the
colour segmenter), the overlay panels, every bad flag / file / dataset / output folder as one line
before any model loads, results written as they come (a crash keeps the finished batches), and end
to end runs on a tiny random model: greedy, --vote with its default curve and --compare, the
standalone --compare of two folders, and 2 gloo processes vs 1.
Run: .venv/bin/python -m pytest -q tests/test_eval.py
"""
import ast, json, os, runpy, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image

import lora, pipeline, stats, vis
from sandbox import world
from sandbox.tiny import build_tiny_policy
import model as M
import segment as S
from data import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pure_parts():
    """eval.py is a script (importing it would run an evaluation): take its imports and function
    definitions only, and execute those."""
    src = open(os.path.join(ROOT, 'eval.py')).read()
    keep = [n for n in ast.parse(src).body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    ns = {}
    exec(compile(ast.Module(keep, type_ignores=[]), 'eval.py', 'exec'), ns)
    return ns


E = _pure_parts()
LOAD_POLICY = M.load_policy


def greedy_answer(masks):
    """A parsed single answer with the given object masks, shaped like pipeline.segment_answers."""
    masks = np.asarray(masks, bool)
    return [([{'label': 'x', 'bbox_2d': [0, 0, 1, 1], 'point_2d': [0, 0]}] * len(masks), masks,
             np.ones(len(masks), np.float32))]


def tiny_sample(masks, ignore=None, hw=(4, 4)):
    return Sample(id='t', image=np.zeros((*hw, 3), np.uint8), query='q', ignore=ignore,
                  masks=np.asarray(masks, bool).reshape(-1, *hw))


# ------------------------------------------------------------------ one query (method §12)
def test_empty_prediction_on_empty_gt_is_one():
    r, pred, _ = E['score_query'](tiny_sample([]), greedy_answer(np.zeros((0, 4, 4))), [1])
    assert (r['inter'], r['union'], r['iou']) == (0, 0, 1.0) and r['gt_empty'] and r['pred_empty']
    # an empty prediction on a non-empty GT is 0, and a parse failure is an empty prediction
    gt = np.zeros((4, 4), bool)
    gt[0] = True
    r, _, _ = E['score_query'](tiny_sample([gt]), [(None, np.zeros((0, 4, 4), bool), np.zeros(0))], [1])
    assert (r['inter'], r['union'], r['iou'], r['failed'], r['pred_empty']) == (0, 4, 0.0, 1, True)


def test_ignore_pixels_are_excluded():
    gt, ignore, pred = np.zeros((3, 4, 4), bool)
    gt[0], ignore[1] = True, True      # GT: row 0 (4 px); ignore: row 1 (4 px)
    pred[:2] = True
    pred[2, 0] = True                  # prediction: rows 0-1 and one pixel of row 2 (9 px)
    r, _, _ = E['score_query'](tiny_sample([gt], ignore), greedy_answer([pred]), [1])
    assert (r['inter'], r['union']) == (4, 5) and r['iou'] == pytest.approx(0.8)  # not 4/9
    r, _, _ = E['score_query'](tiny_sample([gt]), greedy_answer([gt, ignore]), [1])  # union of objects
    assert (r['inter'], r['union']) == (4, 8)


def test_shard_runs_the_single_process_batches():
    for n, batch, ws in [(4, 2, 2), (7, 3, 2), (10, 4, 3), (2, 8, 4)]:
        parts = [E['shard'](n, batch, r, ws) for r in range(ws)]
        got = sorted(b for part in parts for b in part)
        assert got == [(b, list(range(i, min(i + batch, n)))) for b, i in enumerate(range(0, n, batch))]


def test_default_curve_is_the_powers_of_two_up_to_the_vote():
    assert E['parse_curve'](None, 1) == [1] and E['parse_curve'](None, 8) == [1, 2, 4, 8]
    assert E['parse_curve'](None, 6) == [1, 2, 4, 6] and E['parse_curve']('3,1', 2) == [1, 2, 3]


def test_score_query_teacher_answers_and_voting():
    s = next(x for x in world.dataset('test', 20) if len(x.masks) >= 2)
    teacher = world.answer_text(s, (224, 224))  # model space = original: exact boxes and points
    texts = [teacher, 'garbage', teacher, '<answer>[]</answer>']
    answers = pipeline.segment_answers(S.ColorSegmenter(), s, texts, 224, 'pixel')
    r, pred, layers = E['score_query'](s, answers[:1], [1])  # greedy: union of the objects
    assert r['iou'] == 1.0 and np.array_equal(pred, s.gt_mask) and len(layers) == len(s.masks)
    assert [lay['box'] for lay in layers] == [list(map(int, b)) for b in s.boxes]  # the answer's boxes, drawn
    r, pred, layers = E['score_query'](s, answers, [1, 2, 4])
    # n=1: one teacher; n=2: teacher + abstain; n=4: 2 teachers, 1 abstain, 1 no-object (1/3 < 0.5)
    assert {n: tuple(v) for n, v in r['curve'].items()} == {n: (s.gt_mask.sum(),) * 2 for n in ('1', '2', '4')}
    assert r['failed'] == 1 and [c['votes'] for c in r['clusters']] == [2] * len(s.masks)
    assert all(lay['kept'] and lay['votes'] == 2 for lay in layers) and np.array_equal(pred, s.gt_mask)
    r, pred, _ = E['score_query'](s, [answers[3], answers[3], answers[0]], [3])  # no-object majority
    assert not pred.any() and r['pred_empty'] and r['inter'] == 0


def test_overlay_panels():
    s = world.sample('test', 0)
    m = s.gt_mask
    img, g, pr = vis.panels(s.image, m, None, [vis.layer(m)])
    assert np.array_equal(img, s.image)                                   # panel 1: the image
    assert np.array_equal(g[m], s.image[m]) and (g[~m] < s.image[~m].clip(4)).all()  # GT kept, rest dimmed
    first = np.array(vis.PALETTE[0])  # panel 3: the kept object moves towards the first colour
    assert (np.abs(pr[m].astype(int) - first).sum(-1) < np.abs(s.image[m].astype(int) - first).sum(-1)).all()


# ------------------------------------------------------------------ bad input: one line, before any model
def probe(argv, monkeypatch, model_may_load=False):
    """Run eval.py in this process; -> its one-line error. Fails if a model loads (unless allowed)."""
    monkeypatch.setattr(M, 'load_policy', LOAD_POLICY if model_may_load else
                        lambda *a, **k: pytest.fail('a model loaded before validation'))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['eval.py', *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    msg = str(e.value.code)
    assert msg.startswith('[eval] error: ') and '\n' not in msg, msg
    return msg


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=world.vocabulary(),
                               prompt='find: {question}')


@pytest.fixture(scope='module')
def adapters(tiny, tmp_path_factory):
    """A good adapter of the tiny model, and truncated / garbled / NaN / wrong-rank copies of it."""
    d = tmp_path_factory.mktemp('adapters')
    net, _ = M.load_policy(tiny)
    lora.apply_lora(net, r=2, alpha=4)
    good = str(d / 'good.safetensors')
    lora.save_lora(net, good, dict(base=tiny, image_size=112))
    raw = open(good, 'rb').read()
    open(d / 'truncated.safetensors', 'wb').write(raw[:len(raw) // 2])
    open(d / 'garbled.safetensors', 'wb').write(b'\x07' * 64 + raw[64:])
    from safetensors.torch import save_file
    state, meta = lora.read_lora(good)  # rank 2 tensors whose metadata says rank 3
    save_file(state, str(d / 'mismatch.safetensors'),
              metadata={**{k: json.dumps(v) for k, v in meta.items()}, 'r': '3'})
    next(m for _, m in lora.lora_modules(net)).lora_B.data.fill_(float('nan'))
    lora.save_lora(net, str(d / 'nan.safetensors'), dict(base=tiny))
    return {k: str(d / f'{k}.safetensors') for k in ('good', 'truncated', 'garbled', 'nan', 'mismatch')}


def test_bad_flags_are_one_line_before_any_model(tmp_path, monkeypatch):
    out = ['--out', tmp_path / 'o']
    for argv, words in [(['--vote', 0], '--vote 0'), (['--limit', 0], '--limit 0'), (['--batch', 0], '--batch 0'),
                        (['--curve', '1,two,4'], '--curve 1,two,4'), (['--curve', '0,2'], '--curve 0,2'),
                        (['--vote', 4, '--temperature', 0], '--temperature 0'), (['--vis-n', -1], '--vis-n -1'),
                        (['--max-new-tokens', 0], '--max-new-tokens 0'), (['--sam', tmp_path / 'x.pth'], '--sam'),
                        (['--prompt-file', tmp_path / 'p.txt'], '--prompt-file'),
                        (['--compare', 'a', 'b', 'c'], '--compare takes one folder'),
                        (['--gen-chunk', 0], '--gen-chunk 0')]:
        assert words in probe(argv + out, monkeypatch)
    open(tmp_path / 'file', 'w').close()
    assert 'is a file' in probe(['--out', tmp_path / 'file', '--limit', 2], monkeypatch)
    assert 'cannot write' in probe(['--out', '/proc/evalx-test', '--limit', 2], monkeypatch)
    os.makedirs(tmp_path / 'done')
    open(tmp_path / 'done' / 'summary.json', 'w').write('{}')
    assert 'holds an earlier eval' in probe(['--out', tmp_path / 'done', '--limit', 2], monkeypatch)


def test_bad_model_adapter_and_data_are_one_line(tiny, adapters, tmp_path, monkeypatch):
    out = ['--out', tmp_path / 'o', '--limit', 2]
    assert '--model' in probe(['--model', tmp_path / 'nope'] + out, monkeypatch)
    assert 'no such file' in probe(['--model', tiny, '--adapter', tmp_path / 'x.safetensors'] + out, monkeypatch)
    for kind in ('truncated', 'garbled'):
        assert f'--adapter: LoRA adapter {adapters[kind]}: unreadable' in probe(['--adapter', adapters[kind]] + out,
                                                                                 monkeypatch)
    assert 'NaN' in probe(['--model', tiny, '--adapter', adapters['nan']] + out, monkeypatch)
    assert '--data' in probe(['--model', tiny, '--data', tmp_path / 'nope'] + out, monkeypatch)
    os.makedirs(tmp_path / 'empty')
    assert '--data' in probe(['--model', tiny, '--data', tmp_path / 'empty'] + out, monkeypatch)
    bad = tmp_path / 'reasonseg'  # one ReasonSeg item whose json is broken: refused, or skipped to nothing
    os.makedirs(bad)
    Image.new('RGB', (8, 8)).save(bad / 'a.jpg')
    open(bad / 'a.json', 'w').write('{"text": ["q"], "shapes": [{"label": "t", "points": [[1, 1]]}]}')
    assert 'a.json' in probe(['--model', tiny, '--data', bad] + out, monkeypatch)
    assert 'no usable sample' in probe(['--model', tiny, '--data', bad, '--skip-bad'] + out, monkeypatch)
    # an adapter that does not fit once the model is there: the load error is one line too
    msg = probe(['--model', tiny, '--adapter', adapters['mismatch']] + out, monkeypatch, model_may_load=True)
    assert msg.startswith(f'[eval] error: cannot load {tiny} with {adapters["mismatch"]}') and 'rank' in msg
    msg = probe(['--model', tiny, '--image-size', 13] + out, monkeypatch, model_may_load=True)  # needs the processor
    assert '--image-size 13: must be a multiple of 28' in msg


def test_compare_refuses_other_queries_before_generating(tiny, tmp_path, monkeypatch):
    os.makedirs(tmp_path / 'other')
    with open(tmp_path / 'other' / 'samples.jsonl', 'w') as f:
        for i in range(3):
            s = world.sample('test', i)
            f.write(json.dumps(dict(id=s.id, query=s.query, inter=1, union=2, reasoning_type=s.reasoning_type)) + '\n')
    msg = probe(['--model', tiny, '--limit', 4, '--out', tmp_path / 'o', '--compare', tmp_path / 'other'], monkeypatch)
    assert 'different queries' in msg
    assert 'no samples.jsonl' in probe(['--compare', tmp_path, tmp_path / 'other'], monkeypatch)


def test_default_folder_moves_on_and_says_so(tmp_path, capsys):
    base = str(tmp_path / 'ev')
    assert E['output_folder'](None, base) == base  # free: used as is
    for d in (base, base + '-2'):
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, 'samples.jsonl'), 'w').write('{}\n')
    assert E['output_folder'](None, base) == base + '-3'
    assert f'{base} holds an earlier eval: writing to {base}-3' in capsys.readouterr().out


def test_records_are_written_as_they_come(tiny, tmp_path, monkeypatch):
    """A crash in the third batch leaves the two finished batches in samples.jsonl."""
    real, calls = pipeline.segment_answers, []

    def crash_late(*a, **k):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError('simulated crash')
        return real(*a, **k)
    monkeypatch.setattr(pipeline, 'segment_answers', crash_late)
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--model', tiny, '--limit', '6', '--batch', '2', '--max-new-tokens',
                                      '8', '--image-size', '112', '--vis-n', '0', '--out', str(tmp_path / 'o')])
    with pytest.raises(RuntimeError, match='simulated'):
        runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    lines = open(tmp_path / 'o' / 'samples.jsonl').read().splitlines()
    assert [json.loads(line)['index'] for line in lines] == [0, 1, 2, 3]


# ------------------------------------------------------------------ end to end (subprocess)
def run(args, procs=1):
    launcher = [sys.executable] + (['-m', 'torch.distributed.run', '--nproc_per_node', str(procs)] if procs > 1 else [])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(launcher + ['eval.py', *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = str(args[args.index('--out') + 1])
    recs = [json.loads(line) for line in open(os.path.join(out, 'samples.jsonl'))]
    return r.stdout, json.load(open(os.path.join(out, 'summary.json'))), recs, out


def common(tiny, out, n=6):
    return ['--model', tiny, '--image-size', '112', '--limit', n, '--batch', '2', '--max-new-tokens', '30',
            '--out', out]


def test_end_to_end_greedy_vote_compare_and_two_processes(tiny, tmp_path):
    # 6 queries in batches of 2: under 2 ranks, rank 0 runs batches 0 and 2, so the merge must reorder
    stdout, s1, r1, out1 = run(common(tiny, tmp_path / 'g1') + ['--vis-n', '2'])
    assert 'batch 2 | 1 threads | greedy' in stdout and 'reasoning (P/F, C/KI, C/R, C/MH together' in stdout
    assert f'results in {out1}/' in stdout and f'overlays in {out1}/vis/' in stdout
    assert [r['id'] for r in r1] == [f'world/test/{i}' for i in range(6)] and all(len(r['answers']) == 1 for r in r1)
    assert s1['n'] == 6 and s1['gIoU'] == pytest.approx(np.mean([r['iou'] for r in r1]))
    assert s1['gIoU_ci'][0] <= s1['gIoU'] <= s1['gIoU_ci'][1] and 'reasoning' in s1 and 'bootstrap' in s1
    assert s1 == {**s1, **{k: v for k, v in stats.summarize(r1).items()}}  # summary.json = stats of the records
    assert sorted(os.listdir(os.path.join(out1, 'vis'))) == ['00000.png', '00001.png']
    assert Image.open(os.path.join(out1, 'vis', '00000.png')).size[0] >= 3 * 400  # 224 px scenes drawn larger

    stdout, sv, rv, out = run(common(tiny, tmp_path / 'v4') + ['--vote', '4', '--compare', out1])
    # --gen-chunk: a batch's 2 queries x 4 samples = 8 rows, in generate calls of 3 rows: the same answers, same summary
    _, sc, rc, _ = run(common(tiny, tmp_path / 'v4c') + ['--vote', '4', '--gen-chunk', '3'])
    assert rc == rv and {**sc, 'seconds': 0} == {**sv, 'seconds': 0}
    assert sv['vote'] == 4 and set(sv['curve']) == {'1', '2', '4'} and sv['curve']['4']['gIoU'] == sv['gIoU']
    assert all(len(r['answers']) == 4 and len(r['resp_len']) == 4 for r in rv)
    assert Image.open(os.path.join(out, 'curve.png')).size[0] > 100
    cmp = json.load(open(os.path.join(out, 'compare.json')))
    assert cmp['all']['gIoU_diff'] == pytest.approx(sv['gIoU'] - s1['gIoU']) and 'paired difference' in stdout

    # standalone: the same comparison from the two folders, no model
    r = subprocess.run([sys.executable, 'eval.py', '--compare', out, out1], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and 'paired difference' in r.stdout and '[eval] base' not in r.stdout
    assert r.stdout.strip().splitlines()[-len(cmp) + 2:] == stdout.strip().splitlines()[-len(cmp) + 2:]

    _, s2, r2, _ = run(common(tiny, tmp_path / 'g2'), procs=2)
    assert s2.pop('world_size') == 2 and s1.pop('world_size') == 1
    s1.pop('seconds'), s2.pop('seconds')
    assert s2 == s1 and r2 == r1  # same batches, same greedy answers, same sums, one samples.jsonl
    assert sorted(os.listdir(tmp_path / 'g2')) == ['samples.jsonl', 'summary.json', 'vis']


# ------------------------------------------------------------------ faults: limits, training folders, a full disk
def test_floats_limits_and_training_folders_are_one_line_before_any_model(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / 'stage1'
    os.makedirs(run_dir / 'last')
    open(run_dir / 'last' / 'trainer.pt', 'w').close()  # a complete checkpoint marks a training run
    out = ['--out', tmp_path / 'o']
    for argv, words in [(['--temperature', 'nan'], '--temperature nan: must be a finite number'),
                        (['--top-p', 'inf'], '--top-p inf'), (['--vote', 4, '--temperature', 1e6], 'temperature <= 10'),
                        (['--vote', 10 ** 12], '--vote 1000000000000: must be <= 1,024'),
                        (['--curve', '1,2,4096'], '<= 1,024'), (['--limit', 10 ** 12], 'must be <= 10,000'),
                        (['--batch', 10 ** 12], '--batch 1000000000000'), (['--seed', -1], '--seed -1'),
                        (['--out', run_dir], f'inside the training run {run_dir}'),
                        (['--out', run_dir / 'last' / 'eval'], f'inside the training run {run_dir}'),
                        (['--save-vis', run_dir / 'vis'], f'--save-vis {run_dir / "vis"}: inside the training run')]:
        assert words in probe(out + argv, monkeypatch)
    capsys.readouterr()  # drop what the probes printed (e.g. the untrained-base warning)
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--limit', '1e12'])
    with pytest.raises(SystemExit):  # argparse's own errors are one line too, not the usage
        runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    err = capsys.readouterr().err.strip()
    assert err.startswith("[eval] error: argument --limit/--n: invalid int value: '1e12'") and '\n' not in err


def test_a_full_disk_is_one_line(tiny, tmp_path):
    """samples.jsonl cannot be written (ENOSPC, tests/disk_full.py): one line naming it, no traceback."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DISK_FULL': 'samples.jsonl', 'PYTHONPATH': ROOT}
    r = subprocess.run([sys.executable, 'tests/disk_full.py', 'eval.py', *map(str, common(tiny, tmp_path / 'o', 2)),
                        '--vis-n', '0'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith('[eval] error: cannot write') and 'No space left' in r.stderr


def test_eval_without_an_adapter_says_it_evaluates_the_untrained_base(tmp_path):
    # the sandbox with no runs/ (a fresh clone before training): the shipped base, said before and after
    os.symlink(os.path.join(ROOT, 'sandbox'), tmp_path / 'sandbox')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), '--limit', '2', '--max-new-tokens', '8',
                        '--vis-n', '0', '--out', tmp_path / 'o'], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if 'UNTRAINED base sandbox/stage0' in line]
    assert len(warnings) == 2 and 'python train.py --stage 2' in warnings[0]
