"""Tests for data.py: the dataset loaders (method §11), gt_point and resize_for_model (method §3).

Every fixture is written by hand into tmp_path (LISA-style folders, parquet, save_to_disk-style arrow);
expected masks are stated pixel by pixel with numpy slices, not produced by the code under test.
Run: .venv/bin/python -m pytest -q tests/test_data.py
"""
import io, json, os, sys
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data



def png(arr):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr)).save(buf, format='PNG')
    return buf.getvalue()

def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)

def boxes(h, w, *yyxx):
    """(h, w) bool with the half-open boxes (y0, y1, x0, x1) set."""
    m = np.zeros((h, w), bool)
    for y0, y1, x0, x1 in yyxx:
        m[y0:y1, x0:x1] = True
    return m

def brute_point(mask):
    """Independent GT point: for every foreground pixel the squared distance to the nearest
    background pixel, the image surrounded by a ring of background; first maximum in row-major order."""
    pad = np.pad(np.asarray(mask, bool), 1)
    by, bx = np.nonzero(~pad)
    best, arg = -1, None
    for y in range(1, pad.shape[0] - 1):
        for x in range(1, pad.shape[1] - 1):
            if pad[y, x]:
                d = int(((by - y) ** 2 + (bx - x) ** 2).min())
                if d > best:
                    best, arg = d, (float(x - 1), float(y - 1))
    return arg

# ----------------------------------------------------------------------------- gt_point, resize
def test_gt_point_matches_brute_force():
    rng = np.random.default_rng(0)
    masks = [rng.random((9, 13)) < p for p in (0.5, 0.8, 0.95)]
    single = boxes(5, 5, (3, 4, 2, 3))
    masks += [boxes(10, 12, (1, 9, 1, 4), (6, 9, 1, 11)), single, np.ones((4, 7), bool),
              boxes(30, 40, (12, 19, 20, 31), (15, 16, 25, 33))]  # L shape, 1 px, full, off the edges
    for m in masks:
        assert data.gt_point(m) == brute_point(m)
    assert data.gt_point(single) == (2.0, 3.0)
    assert data.gt_point(np.ones((5, 5), bool)) == (2.0, 2.0)  # edge counts as boundary: the centre
    with pytest.raises(ValueError):
        data.gt_point(np.zeros((3, 3), bool))

def test_resize_for_model():
    out = data.resize_for_model(np.full((30, 50, 3), 77, np.uint8))
    assert out.size == (840, 840) and out.mode == 'RGB'
    assert (np.asarray(out) == 77).all()
    ramp = np.array([[[0] * 3, [255] * 3]], np.uint8)  # 1x2: black, white
    row = np.asarray(data.resize_for_model(ramp, size=8))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and 0 < row[4] < 255  # interpolated, not nearest

# ----------------------------------------------------------------------------- ReasonSeg (LISA)
def write_lisa(folder, name, h, w, shapes, text=('where can i sit?', 'alt'), colour=(90, 120, 200)):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(os.path.join(folder, name + '.jpg'))
    with open(os.path.join(folder, name + '.json'), 'w') as f:
        json.dump({'text': list(text), 'is_sentence': True, 'shapes': [
            {'label': lab, 'points': pts, 'shape_type': 'polygon'} for lab, pts in shapes]}, f)

def test_reasonseg_folder(tmp_path):
    folder = tmp_path / 'val'
    # 8 rows x 10 columns. File order is smallest first, to show the loader sorts by area.
    tri = [[7, 4], [7, 6], [9, 6]]                  # pixels (7,4) (7,5) (8,5) (7,6) (8,6) (9,6)
    ign = [[4, 3], [8.9, 3], [8.9, 6.5], [4, 6.5]]  # truncated -> columns 4..8, rows 3..6
    tgt = [[1, 1], [6, 1], [6, 5], [1, 5]]          # columns 1..6, rows 1..5
    flag = [[0, 0], [9, 0], [9, 7], [0, 7]]         # whole image, must vanish
    write_lisa(folder, 'a', 8, 10, [('flag', flag), ('target', tri), ('Ignore_1', ign), ('chair', tgt)])
    write_lisa(folder, 'b', 6, 6, [('flag', flag)])  # no polygon at all -> skipped, reported
    with pytest.warns(UserWarning, match=r"skipped 1 file.*b\.json"):
        s, = data.load_reasonseg(str(folder))
    assert s.id == 'reasonseg/val/a' and s.query == 'where can i sit?'
    assert s.image.shape == (8, 10, 3) and s.image.dtype == np.uint8
    assert np.abs(s.image.astype(int) - [90, 120, 200]).max() <= 3  # JPEG of a flat colour

    t1, ign_px = boxes(8, 10, (1, 6, 1, 7)), boxes(8, 10, (3, 7, 4, 9))
    t2 = np.zeros((8, 10), bool)
    t2[[4, 5, 5, 6, 6, 6], [7, 7, 8, 7, 8, 9]] = True  # (row, column) of the triangle's pixels
    # area order 30 (target) > 20 (ignore) > 6 (triangle): the ignore rectangle cuts the big target,
    # the triangle drawn last stays target inside the ignore rectangle.
    exp_ignore = ign_px & ~t2
    exp_t1 = t1 & ~exp_ignore
    assert s.masks.shape == (2, 8, 10) and s.masks.dtype == bool
    np.testing.assert_array_equal(s.masks[0], exp_t1)
    np.testing.assert_array_equal(s.masks[1], t2)
    np.testing.assert_array_equal(s.ignore, exp_ignore)
    assert not (s.gt_mask & s.ignore).any() and not s.ignore[0, 0]
    assert exp_t1.sum() == 30 - 9 and exp_ignore.sum() == 20 - 5
    np.testing.assert_array_equal(s.boxes, [[1, 1, 6, 5], [7, 4, 9, 6]])
    np.testing.assert_array_equal(s.points, [brute_point(exp_t1), brute_point(t2)])
    with pytest.warns(UserWarning, match='skipped 1 file'):
        assert data.load_dataset(str(folder))[0].id == s.id  # dispatch to the ReasonSeg loader

def test_reasonseg_corrupt(tmp_path):
    folder = tmp_path / 'test'
    write_lisa(folder, 'good', 6, 6, [('target', [[1, 1], [3, 1], [3, 3]])])
    write_lisa(folder, 'line', 6, 6, [('target', [[1, 1], [3, 1]])])
    (folder / 'zbad.json').write_text('{"text": [')
    (folder / 'zbad.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(data.BadData, match=r'line\.json.*shapes\[0\] has 2 points'):
        data.load_reasonseg(str(folder))
    with pytest.warns(UserWarning, match=r'skipped 2 corrupt'):
        kept = data.load_reasonseg(str(folder), skip_bad=True)
    assert [s.id for s in kept] == ['reasonseg/test/good']
    os.remove(folder / 'line.json')
    with pytest.raises(data.BadData, match=r'zbad\.json'):
        data.load_reasonseg(str(folder))

# ----------------------------------------------------------------------------- HF-style rows
def hf_rows():
    """Two eval rows: a 6x7 image with a 5-pixel mask (K = 1) and a 4x5 image with an empty mask."""
    im0, im1 = rgb(6, 7, 1), rgb(4, 5, 2)
    m0, m1 = boxes(6, 7, (2, 3, 1, 4), (3, 5, 5, 6)), np.zeros((4, 5), bool)
    rows = {'image': [{'bytes': png(im0), 'path': 'a.png'}, {'bytes': png(im1), 'path': None}],
            'text': ['what holds the soup?', 'the thing that is not there'],
            'mask': [m0.tolist(), m1.tolist()], 'image_id': ['img0', 'img1'], 'ann_id': [3, 4],
            'img_height': [6, 4], 'img_width': [7, 5], 'reasoning_type': ['P/F', 'C/MH'],
            'bbox': [[1, 2, 5, 4], [0, 0, 0, 0]]}
    return rows, (im0, im1), (m0, m1)

def check_hf(samples, name, ims, ms):
    assert [s.id for s in samples] == [f'{name}/0/img0/3', f'{name}/1/img1/4']
    assert [s.reasoning_type for s in samples] == ['P/F', 'C/MH']
    assert samples[0].query == 'what holds the soup?'
    for s, im, m in zip(samples, ims, ms):
        np.testing.assert_array_equal(s.image, im)
        np.testing.assert_array_equal(s.gt_mask, m)
    assert samples[0].masks.shape == (1, 6, 7) and samples[1].masks.shape == (0, 4, 5)
    np.testing.assert_array_equal(samples[0].boxes, [[1, 2, 5, 4]])
    np.testing.assert_array_equal(samples[0].points, [brute_point(ms[0])])
    assert samples[1].boxes.shape == (0, 4)

def test_hf_parquet(tmp_path):
    rows, ims, ms = hf_rows()
    pq.write_table(pa.table(rows), tmp_path / 'test.parquet', row_group_size=1)  # 2 record batches
    check_hf(data.load_hf(str(tmp_path / 'test.parquet')), 'test', ims, ms)
    check_hf(data.load_dataset(str(tmp_path / 'test.parquet')), 'test', ims, ms)
    check_hf(data.load_dataset(str(tmp_path)), tmp_path.name, ims, ms)  # a folder of parquet files
    rows['mask'] = [{'bytes': png(m.astype(np.uint8)), 'path': None} for m in ms]  # 0/1 PNG struct
    rows['image'] = [r['bytes'] for r in rows['image']]  # raw bytes instead of the struct
    pq.write_table(pa.table(rows), tmp_path / 'x.parquet')
    check_hf(data.load_hf(str(tmp_path / 'x.parquet')), 'x', ims, ms)

def test_hf_save_to_disk_arrow(tmp_path):
    rows, ims, ms = hf_rows()
    table = pa.table(rows)
    folder = tmp_path / 'val'
    folder.mkdir()
    for k in range(2):  # one row per shard, in the IPC stream format `datasets` writes
        with ipc.new_stream(str(folder / f'data-0000{k}-of-00002.arrow'), table.schema) as w:
            w.write_table(table.slice(k, 1))
    (folder / 'dataset_info.json').write_text('{}')
    (folder / 'state.json').write_text('{"_data_files": []}')
    check_hf(data.load_dataset(str(folder)), 'val', ims, ms)
    bad = table.slice(1, 1).set_column(0, 'image', pa.array([{'bytes': b'junk', 'path': None}],
                                                             table.schema.field('image').type))
    with ipc.new_stream(str(folder / 'data-00001-of-00002.arrow'), table.schema) as w:
        w.write_table(bad)  # a bad row in shard 2 is named by its file and its row there
    with pytest.raises(data.BadData, match=r'data-00001-of-00002\.arrow: row 0: field image'):
        data.load_dataset(str(folder))
    with ipc.new_file(str(tmp_path / 'plain.arrow'), table.schema) as w:  # Arrow file format too
        w.write_table(table)
    check_hf(data.load_hf(str(tmp_path / 'plain.arrow')), 'plain', ims, ms)

def two_rows_second_bad(tmp_path, rows, col, value):
    """rows[0] twice, with `col` of the second replaced -> parquet path (a row-1 error expected)."""
    two = {k: [v[0], v[0]] for k, v in rows.items()}
    two[col][1] = value
    pq.write_table(pa.table(two), tmp_path / 'bad.parquet')
    return str(tmp_path / 'bad.parquet')

@pytest.mark.parametrize('col, value, match', [
    ('image', {'bytes': b'\x89PNG garbage', 'path': None}, 'field image: unreadable image'),
    ('mask', [[True] * 6] * 6, r'field mask: mask shape \(6, 6\) != image shape \(6, 7\)'),
    ('mask', [[True] * 7] * 5 + [[True] * 6], 'field mask: ragged'),
    ('img_height', 99, 'fields img_height, img_width != image shape'),
    ('text', None, "KeyError: 'text'"),
    ('text', '', 'field text must be a non-empty string')])
def test_hf_corrupt_row(tmp_path, col, value, match):
    path = two_rows_second_bad(tmp_path, hf_rows()[0], col, value)
    with pytest.raises(data.BadData, match=r'bad\.parquet: row 1: ' + match):
        data.load_hf(path)
    with pytest.warns(UserWarning, match='skipped 1 corrupt'):
        assert [s.id for s in data.load_hf(path, skip_bad=True)] == ['bad/0/img0/3']

# ----------------------------------------------------------------------------- stage-1 rows
MA, MB = boxes(16, 16, (2, 5, 3, 9)), boxes(16, 16, (10, 15, 10, 12))
SOL = [{'bbox_2d': [3, 2, 8, 4], 'point_2d': [5, 3]},
       {'bbox_2d': [10, 10, 11, 14], 'point_2d': [11, 12]}]

def stage1_rows(im):
    return {'problem': ['the two red cups'], 'image': [{'bytes': png(im), 'path': None}],
            'solution': [json.dumps(SOL)], 'solution_mask': [[MA.tolist(), MB.tolist()]],
            'img_height': [480], 'img_width': [640]}

def test_stage1_rows(tmp_path):
    im = rgb(16, 16, 3)
    pq.write_table(pa.table(stage1_rows(im)), tmp_path / 'train.parquet')
    s, = data.load_dataset(str(tmp_path / 'train.parquet'))
    assert s.id == 'train/0' and s.query == 'the two red cups' and s.labels == []
    np.testing.assert_array_equal(s.image, im)  # the stored (840-space) image IS the original
    np.testing.assert_array_equal(s.masks, np.stack([MA, MB]))
    np.testing.assert_array_equal(s.boxes, [o['bbox_2d'] for o in SOL])
    np.testing.assert_array_equal(s.points, [o['point_2d'] for o in SOL])

@pytest.mark.parametrize('col, value, match', [
    ('solution', '[{"bbox_2d": [3, 2, 8, 4], "point_2d": [5, 3]', 'field solution is not a JSON list'),
    ('solution', json.dumps([{'bbox_2d': [3, 2, 80, 4], 'point_2d': [5, 3]}]),
     'field solution has coordinates outside the 16x16'),
    ('solution_mask', [MA.tolist()], 'field solution_mask has 1 masks for 2 objects'),
    ('solution_mask', [MA.tolist(), MB[:8].tolist()],
     r'field solution_mask\[1\]: mask shape \(8, 16\)'),
    ('solution', json.dumps([{'bbox_2d': [3, 2, float('nan'), 4], 'point_2d': [5, 3]}] * 2),
     'field solution has a NaN or infinite'),
    ('solution', json.dumps([{'bbox_2d': [8, 2, 3, 4], 'point_2d': [5, 3]}] * 2),
     'field solution has an inverted box'),
    ('solution_mask', [MA.tolist(), np.zeros((16, 16), bool).tolist()],  # a box, but no pixel: not "no target"
     r'field solution_mask\[1\] is empty but solution\[1\] has the box \[10.0, 10.0, 11.0, 14.0\]'),
    ('solution_mask', [MB.tolist(), MA.tolist()],  # masks in another order than the objects
     r'field solution_mask\[0\] has no pixel inside its box solution\[0\]')])
def test_stage1_corrupt_row(tmp_path, col, value, match):
    path = two_rows_second_bad(tmp_path, stage1_rows(rgb(16, 16, 3)), col, value)
    with pytest.raises(data.BadData, match=r'bad\.parquet: row 1: ' + match):
        data.load_training_rows(path)
    with pytest.warns(UserWarning, match='skipped 1 corrupt'):
        assert [s.id for s in data.load_training_rows(path, skip_bad=True)] == ['bad/0']

def test_stage2_rows_as_published(tmp_path):
    # ReasonSeg-X train: problem, image, solution_mask (one mask per target), no solution
    im = rgb(16, 16, 4)
    rows = {'problem': ['what could hold soup?', 'nothing here'], 'image': [{'bytes': png(im), 'path': None}] * 2,
            'solution_mask': [[MA.tolist(), MB.tolist()], []]}
    pq.write_table(pa.table(rows), tmp_path / 'rsx.parquet')
    s, none = data.load_dataset(str(tmp_path / 'rsx.parquet'))
    assert s.query == 'what could hold soup?' and s.id == 'rsx/0'
    np.testing.assert_array_equal(s.masks, np.stack([MA, MB]))
    np.testing.assert_array_equal(s.boxes, [[3, 2, 8, 4], [10, 10, 11, 14]])  # inclusive extent of each mask
    np.testing.assert_array_equal(s.points, [brute_point(MA), brute_point(MB)])
    assert none.masks.shape == (0, 16, 16) and none.boxes.shape == (0, 4)  # no target
    rows['solution_mask'][1] = [np.zeros((16, 16), bool).tolist()]
    pq.write_table(pa.table(rows), tmp_path / 'bad.parquet')
    with pytest.raises(data.BadData, match=r'bad\.parquet: row 1: field solution_mask\[0\] is empty'):
        data.load_dataset(str(tmp_path / 'bad.parquet'))
    rows['solution_mask'][1] = None  # a null is not "no target": one line naming file, row and field, or skipped
    pq.write_table(pa.table(rows), tmp_path / 'null.parquet')
    with pytest.raises(data.BadData, match=r'null\.parquet: row 1: field solution_mask is null'):
        data.load_dataset(str(tmp_path / 'null.parquet'))
    with pytest.warns(UserWarning, match='skipped 1 corrupt'):
        assert [s.id for s in data.load_dataset(str(tmp_path / 'null.parquet'), skip_bad=True)] == ['null/0']

def test_polygon_off_the_image_and_empty_datasets(tmp_path):
    folder = tmp_path / 'val'
    write_lisa(folder, 'off', 6, 6, [('target', [[10, 10], [14, 10], [14, 14]])])  # wholly outside 6x6
    with pytest.raises(data.BadData, match=r"off\.json: shapes\[0\] \('target'\) lies outside the 6x6"):
        data.load_dataset(str(folder))
    with pytest.warns(UserWarning), pytest.raises(data.BadData, match='no usable sample'):
        data.load_dataset(str(folder), skip_bad=True)  # skipping the only file leaves nothing

# ----------------------------------------------------------------------------- dispatch, pyarrow
def test_dispatch_errors(tmp_path, monkeypatch):
    (tmp_path / 'notes.txt').write_text('hello')
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match='no such file'):
        data.load_dataset(str(tmp_path / 'missing'))
    pq.write_table(pa.table({'a': [1]}), tmp_path / 'other.parquet')
    with pytest.raises(ValueError, match=r"other\.parquet: neither.*\['a'\]"):
        data.load_dataset(str(tmp_path / 'other.parquet'))
    (tmp_path / 'broken.parquet').write_bytes(b'PAR1 this is not parquet')
    with pytest.raises(data.BadData, match=r'broken\.parquet: unreadable parquet'):
        data.load_hf(str(tmp_path / 'broken.parquet'))
    monkeypatch.setitem(sys.modules, 'pyarrow', None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match='pip install pyarrow'):
        data.load_hf(str(tmp_path / 'other.parquet'))


# ----------------------------------------------------------------------------- faults: depth, bounds
def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips a 16-bit grey image to white above 255; it is scaled by 257 instead."""
    grey = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 8-bit values 0..255, stored in 16 bits
    Image.fromarray(grey).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I')  # really stored as 16-bit
    im = data._image(str(tmp_path / 'deep.png'), 'x')
    expected = (grey // 257).astype(np.uint8)
    assert im.dtype == np.uint8 and (im == expected[..., None]).all()


def test_polygon_coordinates_are_bounded_before_rasterising(tmp_path):
    folder = tmp_path / 'val'
    write_lisa(folder, 'far', 8, 8, [('target', [[1, 1], [2 ** 31, 1], [1, 6]])])  # PIL would wrap past 2^31
    with pytest.raises(data.BadData, match=r"far\.json: shapes\[0\] has the point \(2147483648\.0, 1\.0\), "
                                           r"beyond ±1,000,000 px \(the image is 8x8\)"):
        data.load_dataset(str(folder))
    write_lisa(folder, 'far', 8, 8, [('target', [[1, 1], [10 ** 6, 1], [1, 6]])])  # at the bound: rasterised
    s, = data.load_dataset(str(folder))
    assert s.masks[0][1:7, 1].all() and s.masks[0][1, :].sum() == 7  # clipped to the image, as LISA's fillPoly
