"""Tests for predict.py and vis.py: the CLI end to end with teacher answers in place of the model's
(the mask it writes is the ground truth, the answer it prints is in original pixels), greedy and
voted; bad input as one line before any model; the sandbox default on any image; the pictures'
titles ("no target", "predicted: nothing", IoU) and the training curves read back from the figure.
Run: .venv/bin/python -m pytest -q tests/test_predict.py
"""
import json, os, subprocess, sys, types
import numpy as np
import pytest
from PIL import Image

import model as M
import pipeline, predict, vis
from sandbox import world
from sandbox.tiny import build_tiny_policy
import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny random policy whose input side is the scenes' own 224 px: teacher answers map back exactly."""
    return build_tiny_policy(str(tmp_path_factory.mktemp('tiny')), words=world.vocabulary(), image_size=224)


@pytest.fixture
def scene(tmp_path):
    """A world test scene with two or more targets, saved as a PNG (lossless: exact colour regions)."""
    s = next(x for x in world.dataset('test', 30) if len(x.masks) >= 2)
    path = tmp_path / 'scene.png'
    Image.fromarray(s.image).save(path)
    return s, str(path)


def run_main(monkeypatch, argv, texts=None):
    """predict.main() in this process; texts(image_size, n) stands in for the model's generation."""
    if texts is not None:
        monkeypatch.setattr(pipeline, 'generate', lambda net, proc, samples, template, size, n=1, **k:
                            [types.SimpleNamespace(texts=texts(size, n))])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['predict.py', *map(str, argv)])
    return predict.main()


@pytest.mark.parametrize('vote', [1, 3])
def test_predict_writes_the_teacher_mask_and_prints_the_answer(tiny, scene, tmp_path, monkeypatch, capsys, vote):
    s, image = scene
    teacher = lambda size, n: ([world.answer_text(s, (size, size))] * 2 + ['<answer>[]</answer>'])[:n]
    run_main(monkeypatch, ['--image', image, '--query', s.query, '--model', tiny, '--vote', vote,
                           '--out', tmp_path / 'out'], teacher)
    out = capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / 'out' / 'scene_mask.png')) > 0
    assert np.array_equal(mask, s.gt_mask)  # the teacher's boxes + points, segmented, = the ground truth
    answer = json.loads(out.split('answer (original pixels): ')[1].splitlines()[0])
    assert [o['bbox_2d'] for o in answer] == [list(map(int, b)) for b in s.boxes]  # mapped back from model space
    assert 'think: ' in out and (('vote: K=' in out) == (vote > 1))
    assert Image.open(tmp_path / 'out' / 'scene.png').size[0] >= 2 * 400  # image | prediction, drawn larger


@pytest.mark.parametrize('vote', [1, 3])
def test_predict_tells_an_unparsable_answer_from_no_object(tiny, scene, tmp_path, monkeypatch, capsys, vote):
    s, image = scene
    figs, draw = [], vis.overlay
    monkeypatch.setattr(vis, 'overlay', lambda *a, **k: figs.append(draw(*a, **k)) or figs[-1])
    for name, text, code, said, title in [
            ('garbled', '<think>x</think><answer>[{"label": ', 3, 'no answer', 'prediction: unparsable answer'),
            ('empty', '<think>x</think><answer>[]</answer>', 0, 'no object', 'prediction: no object')]:
        got = run_main(monkeypatch, ['--image', image, '--query', s.query, '--model', tiny, '--vote', vote,
                                     '--out', tmp_path / name], lambda size, n: [text] * n)
        out, err = capsys.readouterr()
        assert got == code and f'[predict] {said} | wrote' in out
        assert title in texts_of(figs[-1])
        assert ('"no answer", not "no object"' in err) == (code == 3)
        assert ('unparsable (no object list could be read)' if code else '[] (no object)') in out


def test_predict_never_overwrites_without_force(tiny, scene, tmp_path, monkeypatch):
    s, image = scene
    teacher = lambda size, n: [world.answer_text(s, (size, size))] * n  # noqa: E731
    argv = ['--image', image, '--query', s.query, '--model', tiny, '--out', tmp_path / 'o']
    assert run_main(monkeypatch, argv, teacher) == 0
    (tmp_path / 'o' / 'scene_mask.png').write_bytes(b'an earlier result')
    load = M.load_policy
    monkeypatch.setattr(M, 'load_policy', lambda *a, **k: pytest.fail('a model loaded before the refusal'))
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, argv, teacher)
    assert str(e.value.code).startswith('[predict] error: --out') and '--force' in str(e.value.code)
    assert (tmp_path / 'o' / 'scene_mask.png').read_bytes() == b'an earlier result'  # nothing lost
    monkeypatch.setattr(M, 'load_policy', load)
    assert run_main(monkeypatch, argv + ['--force'], teacher) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'o' / 'scene_mask.png')) > 0, s.gt_mask)


def test_predict_bad_input_is_one_line_before_any_model(tiny, scene, tmp_path, monkeypatch):
    monkeypatch.setattr(M, 'load_policy', lambda *a, **k: pytest.fail('a model loaded before validation'))
    _, image = scene
    open(tmp_path / 'not-an-image.png', 'w').write('text')
    for argv, words in [(['--image', tmp_path / 'none.png'], '--image'), (['--image', tmp_path / 'not-an-image.png'],
                        'unreadable'), (['--image', image, '--vote', 0], '--vote 0'),
                        (['--image', image, '--model', tmp_path], '--model'),
                        (['--image', image, '--adapter', tmp_path / 'a.safetensors'], '--adapter')]:
        with pytest.raises(SystemExit) as e:
            run_main(monkeypatch, argv + ['--query', 'q', '--out', tmp_path / 'o'])
        assert str(e.value.code).startswith('[predict] error: ') and words in str(e.value.code)


def test_predict_refuses_an_empty_query_big_numbers_and_outputs_it_must_not_write(tiny, scene, tmp_path,
                                                                                  monkeypatch, capsys):
    """One line, before any model: an empty query, a flag past its limit, an --out inside a training run (a
    reader never writes there) or under a file (not writable: said before the work, not after it)."""
    monkeypatch.setattr(M, 'load_policy', lambda *a, **k: pytest.fail('a model loaded before validation'))
    _, image = scene
    run_dir = tmp_path / 'runs' / 'stage1'
    os.makedirs(run_dir)
    (run_dir / 'train.lock').write_text('{}')
    open(tmp_path / 'file', 'w').close()
    for argv, words in [(['--query', ''], "--query '': empty"), (['--query', '  '], "--query '  ': empty"),
                        (['--vote', 10 ** 12], '--vote 1000000000000: must be <= 1,024'),
                        (['--seed', -1], '--seed -1: must be >= 0'),
                        (['--max-new-tokens', 10 ** 12], '--max-new-tokens 1000000000000: must be <= 32,768'),
                        (['--out', run_dir / 'pred'], f'inside the training run {run_dir}'),
                        (['--out', tmp_path / 'file' / 'sub'], 'cannot write there')]:
        with pytest.raises(SystemExit) as e:
            run_main(monkeypatch, ['--image', image, '--query', 'q', '--out', tmp_path / 'o'] + argv)
        msg = str(e.value.code)
        assert msg.startswith('[predict] error: ') and words in msg and '\n' not in msg, msg
    with pytest.raises(SystemExit):  # argparse's own errors are one line too, not the usage
        run_main(monkeypatch, ['--image', image, '--query', 'q', '--vote', '1e12'])
    err = capsys.readouterr().err.strip()
    assert err.startswith("[predict] error: argument --vote: invalid int value: '1e12'") and '\n' not in err


def test_readers_find_a_save_in_progress_without_repairing_it(tmp_path, monkeypatch):
    """A trainer killed between the renames of its save leaves last.old and last.tmp; eval / predict read the
    newer one where it is and rename nothing (the trainer's own resume repairs it)."""
    import checkpoint, inference, lora
    net, _ = M.load_policy(inference.SANDBOX_BASE)
    lora.apply_lora(net, r=2, alpha=4)
    monkeypatch.chdir(tmp_path)
    for name in ('last.tmp', 'last.old'):
        os.makedirs(f'runs/stage1/{name}')
        lora.save_lora(net, f'runs/stage1/{name}/adapter.safetensors', dict(base=os.path.join(ROOT, 'sandbox/stage0')))
        open(f'runs/stage1/{name}/trainer.pt', 'w').close()
    before = sorted(os.listdir('runs/stage1'))
    base, adapter, meta = inference.resolve(None, None, 'eval')
    assert adapter == os.path.join('runs/stage1/last.tmp', 'adapter.safetensors')
    assert sorted(os.listdir('runs/stage1')) == before == ['last.old', 'last.tmp']
    assert checkpoint.find('runs/stage1/last') == 'runs/stage1/last.tmp'


def test_predict_with_no_flags_runs_the_sandbox_model_on_any_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), np.uint8)).save(tmp_path / 'noise.jpg')
    r = subprocess.run([sys.executable, 'predict.py', '--image', tmp_path / 'noise.jpg', '--query', 'the red circle',
                        '--out', tmp_path / 'o'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert 'is unlike the sandbox world' in r.stderr  # noise is not a scene of flat shapes: said before the answer
    # 0: an answer (objects or "no object"); 3: no readable answer, said as such
    assert r.returncode == 0 or r.returncode == 3 and 'unparsable' in r.stdout and 'no answer' in r.stderr, r.stderr
    assert f'[predict] {inference.SANDBOX_BASE}' in r.stdout or 'runs/stage' in r.stdout
    assert 'think: ' in r.stdout and 'answer (original pixels): ' in r.stdout
    assert Image.open(tmp_path / 'o' / 'noise_mask.png').size == (150, 90)


# ------------------------------------------------------------------ pictures
def texts_of(fig):
    return [ax.get_title() for ax in fig.axes] + [t.get_text() for ax in fig.axes for t in ax.texts] + \
        [t.get_text() for t in fig.texts] + [fig._suptitle.get_text()]


def test_overlay_says_no_target_nothing_predicted_and_the_iou(tmp_path):
    s = world.sample('test', 0)
    empty = np.zeros(s.image.shape[:2], bool)
    fig = vis.overlay(tmp_path / 'a.png', s.image, [], 'find it', 'a long think ' * 30, gt=empty, iou=1.0)
    words = texts_of(fig)
    assert 'ground truth: no target' in words and 'no target' in words and 'predicted: no object' in words
    assert 'prediction: no object · IoU 1.00' in words and any(w.startswith('query: "find it"') for w in words)
    foot = ' '.join(words)  # the lines under the picture
    assert 'think: a long think' in foot and '…' in foot and foot.count('long think') < 30  # shortened
    obj = {'label': 'red circle', 'bbox_2d': [10, 10, 50, 50], 'point_2d': [30, 30]}
    fig = vis.overlay(tmp_path / 'b.png', s.image, [vis.layer(s.masks[0], True, obj, 5), vis.layer(s.masks[0], False,
                      obj, 1)], 'q', gt=s.gt_mask, iou=0.25, n_gt=len(s.masks))
    words = texts_of(fig)
    assert f'ground truth: {len(s.masks)} object' + ('s' if len(s.masks) > 1 else '') in words
    assert 'prediction: 1 of 2 vote clusters kept · IoU 0.25' in words
    # labels stand under the picture, one coloured line each (numbered tags on it): they cannot overlap
    assert '■ 1  red circle · found by 5 samples · kept' in words
    assert '■ 2  red circle · found by 1 sample · dropped' in words
    assert '1' in words and '2' in words
    fig = vis.overlay(tmp_path / 'v.png', s.image, [vis.layer(s.masks[0], True, obj, 5)], 'q', gt=s.gt_mask,
                      note='vote of 8: K=1: kept 1 of 2 clusters (1 below vote ratio)')
    terms = ' '.join(texts_of(fig))  # the vote's terms in words, on the picture
    assert 'K = how many objects most samples answered' in terms and 'fewer than 20% of the readable' in terms
    assert 'cluster = one object as several samples found it' in terms
    fig = vis.overlay(tmp_path / 'c.png', s.image, [vis.layer(s.masks[0], True, obj)], 'q')  # predict.py: 2 panels
    assert len(fig.axes) == 2 and 'prediction: 1 object' in texts_of(fig)
    assert Image.open(tmp_path / 'a.png').size[0] >= 3 * 400


def test_training_curves_plot_every_stage_and_keep_the_last_record_per_step(tmp_path):
    os.makedirs(tmp_path / 'stage0'), os.makedirs(tmp_path / 'stage2')
    with open(tmp_path / 'stage0' / 'log.jsonl', 'w') as f:
        for step in range(1, 5):
            f.write(json.dumps(dict(step=step, loss=5.0 - step, **({'val_giou': 0.1 * step} if step % 2 == 0 else {})))
                    + '\n')
    with open(tmp_path / 'stage2' / 'log.jsonl', 'w') as f:
        for step in [1, 2, 3, 2, 3, 4]:  # resumed after step 3 from the step-1 checkpoint: steps 2, 3 again
            f.write(json.dumps(dict(step=step, reward=float(step), accuracy=step / 10, correct=0.5, resp_len=40 + step,
                                    **({'val_giou': 0.3} if step == 4 else {}))) + '\n')
        f.write(json.dumps(dict(step=0, val_giou=0.25, val_queries='64 held-out queries: P/F, C/KI')) + '\n')
        f.write('{"step": 5, "rew')  # a line cut by a kill
    logs = [tmp_path / 'stage0' / 'log.jsonl', tmp_path / 'stage2' / 'log.jsonl']
    fig = vis.plot_training_curves(logs, tmp_path / 'curves.png')
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ['stage 0: held-out gIoU, % (greedy)', 'stage 0: loss', 'stage 2: reward (mean over rollouts)',
                      'stage 2: accuracy reward', 'stage 2: held-out gIoU, % (greedy)\n64 held-out queries: P/F, C/KI',
                      'stage 2: response length (tokens)']
    val0, reward2, val2 = fig.axes[0], fig.axes[4], fig.axes[6]  # row 0 has 4 panels, two of them hidden
    assert list(val0.lines[0].get_xdata()) == [2, 4] and list(val0.lines[0].get_ydata()) == pytest.approx([20, 40])
    assert list(val2.lines[0].get_ydata()) == pytest.approx([25, 30])  # in %, as eval's tables
    assert val0.get_ylim() == val2.get_ylim() == (0, 100)  # not auto-scaled: a small drift looks small
    raw = reward2.lines[0]  # stage 2's per-step rewards: one per step, the resumed values
    assert list(raw.get_xdata()) == [1, 2, 3, 4] and list(raw.get_ydata()) == [1, 2, 3, 4]
    assert vis._smooth(np.array([1.0, 2, 3, 10]), 1) == pytest.approx([1.5, 2, 5, 6.5])  # fewer points at the ends
    assert Image.open(tmp_path / 'curves.png').size[0] > 1000
    assert vis.plot_training_curves(tmp_path / 'missing.jsonl', tmp_path / 'x.png') is None


def test_save_mask_round_trip(tmp_path):
    m = world.sample('test', 1).gt_mask
    vis.save_mask(m, tmp_path / 'm.png')
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'm.png')) > 0, m)
