"""Tests for eval.py (SPEC §10, §12): metric aggregation against hand-computed values, one query's
scoring with teacher answers (exact masks from the colour segmenter), and end to end runs of the
script on a tiny random model: greedy, --vote 4 with a --curve, and 2 gloo processes vs 1.
Run: .venv/bin/python -m pytest -q tests/test_eval.py
"""
import ast, json, os, subprocess, sys
import numpy as np
import pytest
from PIL import Image

import pipeline, world
import segment as S
from data import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pure_parts():
    """eval.py is a script (importing it would run an evaluation): take its imports, function
    definitions and literal UPPERCASE constants only, and execute those."""
    src = open(os.path.join(ROOT, 'eval.py')).read()
    const = lambda n: isinstance(n, ast.Assign) and isinstance(n.value, (ast.List, ast.Tuple, ast.Constant)) \
        and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)
    keep = [n for n in ast.parse(src).body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef)) or const(n)]
    ns = {}
    exec(compile(ast.Module(keep, type_ignores=[]), 'eval.py', 'exec'), ns)
    return ns


E = _pure_parts()


def rec(inter, union, rtype=None, gt_empty=False, pred_empty=False, failed=0, lens=(10,)):
    return dict(inter=inter, union=union, reasoning_type=rtype, gt_empty=gt_empty, pred_empty=pred_empty,
                failed=failed, resp_len=list(lens))


def greedy_answer(masks):
    """A parsed single answer with the given object masks, shaped like pipeline.segment_answers."""
    masks = np.asarray(masks, bool)
    return [([{'label': 'x', 'bbox_2d': [0, 0, 1, 1], 'point_2d': [0, 0]}] * len(masks), masks,
             np.ones(len(masks), np.float32))]


def tiny_sample(masks, ignore=None, hw=(4, 4)):
    return Sample(id='t', image=np.zeros((*hw, 3), np.uint8), query='q', ignore=ignore,
                  masks=np.asarray(masks, bool).reshape(-1, *hw))


# ------------------------------------------------------------------ metrics (SPEC §12)
def test_empty_prediction_on_empty_gt_is_one():
    r, pred, _ = E['score_query'](tiny_sample([]), greedy_answer(np.zeros((0, 4, 4))), [1])
    assert (r['inter'], r['union'], r['iou']) == (0, 0, 1.0) and r['gt_empty'] and r['pred_empty']
    assert E['iou_stats']([(0, 0)]) == dict(n=1, gIoU=1.0, cIoU=1.0)
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
    # two objects: the prediction is their union
    r, _, _ = E['score_query'](tiny_sample([gt]), greedy_answer([gt, ignore]), [1])
    assert (r['inter'], r['union']) == (4, 8)


def test_ciou_sums_counts_giou_averages_ratios():
    pairs = [(1, 2), (9, 10), (0, 0)]  # IoU 0.5, 0.9, 1 (empty on empty)
    st = E['iou_stats'](pairs)
    assert st['gIoU'] == pytest.approx((0.5 + 0.9 + 1.0) / 3)
    assert st['cIoU'] == pytest.approx(10 / 12)  # not the mean of ratios, not 1.0 for the empty one


def test_summary_per_type_no_object_failures_lengths():
    recs = [rec(1, 2, 'P/F', lens=(10, 20), failed=1), rec(3, 4, 'P/F', lens=(30, 40)),
            rec(0, 5, 'C/R', gt_empty=False, pred_empty=True, failed=2, lens=(5, 5)),
            rec(0, 0, 'C/R', gt_empty=True, pred_empty=True, lens=(1, 1)),
            rec(0, 6, None, gt_empty=True, pred_empty=False, lens=(2, 2))]
    s = E['summarize'](recs)
    assert s['n'] == 5 and s['gIoU'] == pytest.approx((0.5 + 0.75 + 0 + 1 + 0) / 5)
    assert s['cIoU'] == pytest.approx(4 / 17)
    assert set(s['per_type']) == {'P/F', 'C/R'}  # an unknown type counts only in the total
    assert s['per_type']['P/F'] == dict(n=2, gIoU=pytest.approx(0.625), cIoU=pytest.approx(4 / 6))
    assert s['per_type']['C/R'] == dict(n=2, gIoU=pytest.approx(0.5), cIoU=pytest.approx(0.0))
    assert (s['no_object_acc'], s['n_no_object']) == (0.5, 2)
    assert s['format_fail'] == pytest.approx(3 / 10) and s['resp_len'] == pytest.approx(116 / 10)
    assert E['summarize']([rec(1, 2)])['no_object_acc'] is None


def test_shard_runs_the_single_process_batches():
    for n, batch, ws in [(4, 2, 2), (7, 3, 2), (10, 4, 3), (2, 8, 4)]:
        parts = [E['shard'](n, batch, r, ws) for r in range(ws)]
        got = sorted(b for part in parts for b in part)
        assert got == [(b, list(range(i, min(i + batch, n)))) for b, i in enumerate(range(0, n, batch))]


# ------------------------------------------------------------------ one query, real segmenter
def test_score_query_teacher_answers_and_voting():
    s = next(x for x in world.dataset('test', 20) if len(x.masks) >= 2)
    teacher = world.answer_text(s, (224, 224))  # model space = original: exact boxes and points
    texts = [teacher, 'garbage', teacher, '<answer>[]</answer>']
    answers = pipeline.segment_answers(S.ColorSegmenter(), s, texts, 224, 'pixel')
    r, pred, layers = E['score_query'](s, answers[:1], [1])  # greedy: union of the objects
    assert r['iou'] == 1.0 and np.array_equal(pred, s.gt_mask) and len(layers) == len(s.masks)
    r, pred, layers = E['score_query'](s, answers, [1, 2, 4])
    # n=1: one teacher; n=2: teacher + abstain; n=4: 2 teachers, 1 abstain, 1 no-object (1/3 < 0.5)
    assert {n: tuple(v) for n, v in r['curve'].items()} == {n: (s.gt_mask.sum(),) * 2 for n in ('1', '2', '4')}
    assert r['failed'] == 1 and [c['votes'] for c in r['clusters']] == [2] * len(s.masks)
    assert all(kept for _, kept in layers) and np.array_equal(pred, s.gt_mask)
    r, pred, _ = E['score_query'](s, [answers[3], answers[3], answers[0]], [3])  # no-object majority
    assert not pred.any() and r['pred_empty'] and r['inter'] == 0


def test_overlay_panels():
    PALETTE0 = np.array(E['PALETTE'][0])  # panel 3: the first kept cluster moves towards its colour
    s = world.sample('test', 0)
    m = s.gt_mask
    img = E['overlay'](s.image, m, None, [(m, True)])
    H, W = s.image.shape[:2]
    assert img.shape == (H, 3 * W, 3) and img.dtype == np.uint8
    assert np.array_equal(img[:, :W], s.image)                      # panel 1: the image
    assert np.array_equal(img[:, W:2 * W][m], s.image[m])           # panel 2: GT kept, rest dimmed
    assert (img[:, W:2 * W][~m] < s.image[~m].clip(4)).all()
    assert (np.abs(img[:, 2 * W:][m].astype(int) - PALETTE0).sum(-1) < np.abs(s.image[m].astype(int) - PALETTE0).sum(-1)).all()


# ------------------------------------------------------------------ end to end (subprocess)
@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    import model as M
    return M.build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=world.vocabulary(), prompt='find: {question}')


def run(args, tmp, procs=1):
    launcher = [sys.executable] + (['-m', 'torch.distributed.run', '--nproc_per_node', str(procs)] if procs > 1 else [])
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(launcher + ['eval.py', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = os.path.join(tmp, args[args.index('--out') + 1])
    recs = [json.loads(line) for line in open(os.path.join(out, 'samples.jsonl'))]
    return r.stdout, json.load(open(os.path.join(out, 'summary.json'))), recs, out


def common(tiny, tmp, out, n=4):
    return ['--model', tiny, '--image-size', '112', '--limit', str(n), '--batch', '2', '--max-new-tokens', '30',
            '--out', str(tmp / out)]


def test_end_to_end_greedy_vote_curve_and_two_processes(tiny, tmp_path):
    # 6 samples in batches of 2: under 2 ranks, rank 0 runs batches 0 and 2, so the merge must reorder
    stdout, s1, r1, _ = run(common(tiny, tmp_path, 'g1', n=6) + ['--save-vis', str(tmp_path / 'vis'), '--vis-n', '2'], tmp_path)
    assert 'batch 2 | greedy' in stdout and 'gIoU' in stdout
    assert [r['id'] for r in r1] == [f'world/test/{i}' for i in range(6)] and all(len(r['answers']) == 1 for r in r1)
    assert s1['n'] == 6 and s1['gIoU'] == pytest.approx(np.mean([r['iou'] for r in r1]))
    assert sorted(os.listdir(tmp_path / 'vis')) == ['00000.png', '00001.png']
    assert Image.open(tmp_path / 'vis' / '00000.png').size == (3 * 224, 224)

    _, sv, rv, out = run(common(tiny, tmp_path, 'v4') + ['--vote', '4', '--curve', '1,2'], tmp_path)
    assert sv['vote'] == 4 and set(sv['curve']) == {'1', '2', '4'} and sv['curve']['4']['gIoU'] == sv['gIoU']
    assert all(len(r['answers']) == 4 and len(r['resp_len']) == 4 for r in rv)
    assert Image.open(os.path.join(out, 'curve.png')).size[0] > 100

    _, s2, r2, _ = run(common(tiny, tmp_path, 'g2', n=6), tmp_path, procs=2)
    assert s2.pop('world_size') == 2 and s1.pop('world_size') == 1
    assert s2 == s1 and r2 == r1  # same batches, same greedy answers, same sums
