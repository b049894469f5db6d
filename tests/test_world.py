"""Tests for sandbox/world.py: determinism, ground truth that matches each query's definition, split and
template disjointness, and the teacher answer.
Run: python -m pytest tests/test_world.py
"""
import os, re, subprocess, sys
import numpy as np
import pytest
from scipy import ndimage

import model as M
from sandbox import world as W


def attributes(s, rng_free=True):
    """Re-derive every object of a rendered scene from pixels alone: colour, mask, area, centre."""
    bg = np.all(s.image == W.BACKGROUND, -1)
    lab, n = ndimage.label(~bg)
    objs = []
    for k in range(1, n + 1):
        m = lab == k
        colour = next(c for c, v in W.COLORS.items() if np.all(s.image[m][0] == v))
        objs.append(dict(mask=m, colour=colour, area=m.sum(), centre=ndimage.center_of_mass(m)))
    return objs


def test_deterministic_and_splits_disjoint():
    a, b = W.sample('train', 5), W.sample('train', 5)
    assert a.query == b.query and np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    imgs = {split: [W.sample(split, i).image.tobytes() for i in range(40)] for split in ('train', 'val', 'test')}
    assert not set(imgs['train']) & set(imgs['test']) and not set(imgs['val']) & set(imgs['test'])


def test_same_samples_in_every_process():
    """String hashing is salted per process (PYTHONHASHSEED): nothing may depend on set order."""
    code = ("from sandbox import world; print([(s.query, s.labels) for s in world.dataset('test', 40)] + "
            "[(s.query, s.labels) for s in world.dataset('train', 40, families=('C/MH',))])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, 'PYTHONHASHSEED': str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1


def frame_regex(frame):
    return re.compile('^' + re.sub(r'\\\{\w\\\}', '.+', re.escape(frame)) + '$')


def test_template_split():
    for split, held_out in (('train', False), ('test', True)):
        for s in W.dataset(split, 60):
            kinds = [k for k in W.FRAMES if k.startswith(s.reasoning_type)]  # 'C/R' and 'C/R pos'
            used = [(i == len(W.FRAMES[k]) - 1) for k in kinds for i, f in enumerate(W.FRAMES[k])
                    if frame_regex(f).match(s.query)]
            assert used == [held_out], (split, s.query)


@pytest.mark.parametrize('family', W.FAMILIES)
def test_ground_truth_matches_definition(family):
    seen_empty = seen_multi = False
    for s in W.dataset('test', 80, families=(family,)):
        objs = attributes(s)
        gt = {o['mask'].tobytes() for o in objs if any(np.array_equal(o['mask'], m) for m in s.masks)}
        assert len(gt) == len(s.masks) and len(objs) == W.N_OBJ
        q = s.query
        if family == 'C/R' and any(p in q for p in W.POSITIONS):
            p = next(p for p in W.POSITIONS if p in q)
            ref_label = q.split(' the ')[-1]
            refs = [i for i, l in enumerate(s.labels) if l == ref_label]
            assert not refs, 'the reference object is never its own target'
            ref = [o for o in objs if o['mask'].tobytes() not in gt]  # candidates for the reference
            dx, dy = W.POSITIONS[p]
            half = W.SIZE / W.GRID / 2
            for o in objs:  # every target lies beyond some non-target by more than half a cell
                if o['mask'].tobytes() in gt:
                    assert any((o['centre'][1] - r['centre'][1]) * dx > half or
                               (o['centre'][0] - r['centre'][0]) * dy > half for r in ref), q
        elif family == 'C/R':
            r = next(r for r in W.RELATIONS if r in q)
            key = {'largest': lambda o: o['area'], 'smallest': lambda o: -o['area'],
                   'leftmost': lambda o: -o['centre'][1], 'rightmost': lambda o: o['centre'][1],
                   'topmost': lambda o: -o['centre'][0], 'lowest': lambda o: o['centre'][0]}[r]
            best = max(objs, key=key)
            assert len(s.masks) == 1 and np.array_equal(s.masks[0], best['mask']), q
        elif family == 'C/KI':
            cue = next(k for k in W.KNOWLEDGE if q.endswith(k))
            want = {o['mask'].tobytes() for o in objs if o['colour'] == W.KNOWLEDGE[cue]}
            assert gt == want, q
        elif family in ('P/F', 'C/MH', 'explicit'):
            # shapes are not recoverable from colour alone: check against the labels the renderer gave
            labels = s.labels
            if family == 'P/F':
                cue = next(f for f in W.FUNCTION if q.endswith(f))
                assert all(l.endswith(W.FUNCTION[cue]) for l in labels)
            if family == 'explicit' and 'all ' in q:
                colour = q.split()[1]
                assert {o['mask'].tobytes() for o in objs if o['colour'] == colour} == gt
            if family == 'C/MH':
                shape = next(sh for sh in W.SHAPES if f'the {sh}' in q)
                assert all(not l.endswith(shape) for l in labels)
        seen_empty |= len(s.masks) == 0
        seen_multi |= len(s.masks) > 1
    assert seen_empty, f'{family}: no no-target case in 80 samples'
    if family != 'C/R':
        assert seen_multi, f'{family}: no multi-target case in 80 samples'


def test_teacher_answer_parses_to_the_ground_truth():
    for s in W.dataset('train', 20, families=('explicit',)):
        objs = M.parse_answer(W.answer_text(s, (112, 112)))
        assert [o['label'] for o in objs] == s.labels
        back = M.to_original(objs, (W.SIZE, W.SIZE), (112, 112))
        for o, b in zip(back, s.boxes):
            assert np.abs(np.array(o['bbox_2d']) - b).max() <= 2  # one model pixel = 2 original px
        assert W.answer_text(s, (112, 112)).startswith('<think>')


def test_guessed_meanings_ignore_the_query():
    """Stage 0's guessed samples keep the scene and the query but swap in a random explicit meaning
    (colour, shape or both) and its exact grounding: they teach the words and how to answer, and
    agree with the truth only by chance."""
    agree, kinds = 0, set()
    for i in range(200):
        s, g = W.sample('train', i, W.FAMILIES[1:]), W.sample('train', i, W.FAMILIES[1:], guess=True)
        assert g.query == s.query and np.array_equal(g.image, s.image) and s.think is None
        words = g.think.split()
        kinds.add(tuple(w in W.COLORS for w in words))
        scene = [(o['colour'], o['mask']) for o in attributes(g)]
        want = [m for c, m in scene if words[0] not in W.COLORS or c == words[0]]  # colour part
        assert len(g.masks) <= len(want)  # the shape part is checked through the renderer's labels
        assert all(all(w in lab.split() for w in words) for lab in g.labels)
        assert all(any(np.array_equal(m, o) for o in want) for m in g.masks)
        agree += sorted(g.labels) == sorted(s.labels)
    assert kinds == {(True,), (False,), (True, False)}
    assert agree / 200 < 0.5, agree  # chance, not the answer


def test_explicit_think_is_the_query_meaning():
    for s in W.dataset('test', 40, families=('explicit',)):
        words = s.think.split()
        assert all(w in s.query.split() for w in words) and 1 <= len(words) <= 2
        assert all(all(w in lab.split() for w in words) for lab in s.labels)
        assert W.answer_text(s, (112, 112)).startswith(f'<think>{s.think}</think>')


def test_facts_state_what_a_cue_means():
    for i in range(60):
        s = W.sample('train', i, ('fact',))
        meaning = {**W.FUNCTION, **W.KNOWLEDGE}[s.query]
        assert s.think == meaning and s.reasoning_type == 'fact'
        assert all(meaning in lab.split() for lab in s.labels)
        if meaning in W.COLORS:  # every object of that colour is a target (colours are in the pixels)
            assert len(s.masks) == sum(o['colour'] == meaning for o in attributes(s))


def test_attribute_batch_points_at_the_objects_own_visual_token():
    # Independent of sandbox/world.py's index arithmetic: rebuild each merged token's 28x28 pixel block from
    # the processor's patch layout (2x2 patches of 14 px per token, channels x time x 14 x 14) and
    # check that the indexed block shows mostly the object's own colour among the scene's objects.
    _, proc = M.load_policy(os.path.join(os.path.dirname(__file__), '..', 'sandbox', 'stage0'))
    ip = proc.image_processor
    b, idx, col, shp = W.attribute_batch(proc, 'train', 0, 6, 112)
    px = b['pixel_values'].reshape(-1, 2, 2, 3, 2, 14, 14)[:, :, :, :, 0]       # (tokens, 2, 2, 3, 14, 14)
    px = px.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, 28, 28).numpy()            # (tokens, 3, 28, 28)
    rgb = px * np.array(ip.image_std)[:, None, None] + np.array(ip.image_mean)[:, None, None]
    assert len(idx) == 18 and idx.max() < len(rgb) and set(shp.tolist()) <= set(range(len(W.SHAPES)))
    hits = 0
    for i, c in zip(idx.tolist(), col.tolist()):
        near = [(np.abs(rgb[i] * 255 - np.array(v)[:, None, None]).max(0) < 40).sum() for v in W.COLORS.values()]
        hits += int(np.argmax(near) == c and near[c] > 0)
    assert hits >= 16, f'only {hits} of 18 object tokens show their own colour'


def test_likeness_tells_world_scenes_from_other_images():
    import io
    from matplotlib import cbook
    from PIL import Image, ImageDraw

    def jpeg(a, q=50):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format='JPEG', quality=q)
        return np.asarray(Image.open(buf))
    for i in range(40):  # a scene is like the world, saved losslessly or as a rough JPEG
        img = W.sample('test', i).image
        assert W.unlike(img) == '' and W.unlike(jpeg(img)) == ''
    photo = np.asarray(Image.open(cbook.get_sample_data('grace_hopper.jpg')).convert('RGB'))
    light = Image.new('RGB', (300, 200), (235, 235, 235))  # flat shapes of the world's colours, light background
    ImageDraw.Draw(light).ellipse([20, 20, 90, 90], fill=W.COLORS['red'])
    noise = np.random.default_rng(0).integers(0, 256, (90, 150, 3), np.uint8)
    for img in (photo, np.asarray(light), noise):
        assert 'dark grey background' in W.unlike(img)
    # hand-computed: half background, half magenta (no world colour); then red within 40 per channel
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2], img[2:] = W.BACKGROUND, (255, 0, 255)
    assert W.likeness(img) == (0.5, 0.5)
    img[2:] = (255, 75, 5)  # red (220, 40, 40) off by 35 in each channel
    assert W.likeness(img) == (1.0, 0.5)
    img[2:] = (255, 81, 40)  # off by 41 in one channel
    assert W.likeness(img) == (0.5, 0.5)
