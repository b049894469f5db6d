"""rows.py: the table formats users bring (method §11), as parquet files or `datasets.save_to_disk`
arrow folders: HF-style evaluation rows (ReasonSeg-X val/test, ReasonSeg-R, MUSE, MMR: image, text,
mask) and training rows (stage 1: problem, image, solution, solution_mask; stage 2, ReasonSeg-X train
as published: problem, image, solution_mask). Every row becomes a data.Sample; a corrupt row is named
by file, row and field (data.BadData). data.load_dataset picks the loader.
Tested by: python -m pytest tests/test_data.py
"""
import glob, io, json, os
import numpy as np
from PIL import Image

from data import BadData, Sample, _collect, _image, boxes_points, query


def files(path):
    """-> ('parquet'|'arrow', files): a file, a parquet folder, a save_to_disk folder (*.arrow)."""
    for ext in ('parquet', 'arrow'):
        fs = [path] if path.endswith('.' + ext) else sorted(glob.glob(os.path.join(path, '*.' + ext)))
        if fs and os.path.isfile(fs[0]):
            return ext, fs
    return None, []

def open_table(f, kind, schema_only=False):
    try:
        import pyarrow as pa, pyarrow.ipc as ipc, pyarrow.parquet as pq
    except ImportError:
        raise ImportError('pip install pyarrow to read parquet/arrow') from None
    try:
        if kind == 'parquet':
            return pq.read_schema(f) if schema_only else pq.read_table(f)
        try:  # datasets writes the IPC stream format; plain Arrow files use the file format
            r = ipc.open_stream(pa.memory_map(f))
        except pa.ArrowInvalid:
            r = ipc.open_file(pa.memory_map(f))
        return r.schema if schema_only else r.read_all()
    except (OSError, pa.ArrowException) as e:
        raise BadData(f'{f}: unreadable {kind} file ({e})') from None

def _rows(path):
    """-> ("file: row j", name, row index over all files, {column: non-null pyarrow scalar}, folder)"""
    kind, paths = files(path)
    if not paths:
        raise FileNotFoundError(f'{path}: no .parquet or .arrow files there')
    name, i = os.path.splitext(os.path.basename(os.path.normpath(path)))[0], 0
    for f in paths:
        start = i
        for b in open_table(f, kind).to_batches():
            for j in range(b.num_rows):
                row = {c: b.column(c)[j] for c in b.schema.names if b.column(c)[j].is_valid}
                yield f'{f}: row {i - start}', name, i, row, os.path.dirname(f)
                i += 1

def _mask(v, hw, where):
    """pyarrow value -> (H, W) bool, shape checked. The HF sets hold nested lists of bool (read with
    no Python object per pixel); an HF image struct or PNG bytes also work (non-zero = True)."""
    rows = getattr(v, 'values', None)
    if rows is not None and hasattr(rows, 'value_lengths'):  # list<list<...>>: H rows of W
        flat = rows.flatten()
        if rows.null_count or flat.null_count or len(set(rows.value_lengths().to_pylist())) > 1:
            raise BadData(f'{where}: ragged or null nested list')
        m = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(bool).reshape(len(rows), -1)
    else:
        b = v.as_py()
        try:
            m = np.asarray(Image.open(io.BytesIO(b.get('bytes') if isinstance(b, dict) else b)))
        except Exception as e:  # noqa: BLE001
            raise BadData(f'{where}: not nested lists nor image bytes ({type(e).__name__})') from None
        m = (m[..., :3].any(-1) if m.ndim == 3 else m).astype(bool)
    if m.shape != tuple(hw):
        raise BadData(f'{where}: mask shape {m.shape} != image shape {tuple(hw)}')
    return m

def _hf_item(where, name, i, row, base):
    image = _image(row['image'].as_py(), f'{where}: field image', base)
    hw = image.shape[:2]
    if 'img_height' in row and (row['img_height'].as_py(), row['img_width'].as_py()) != hw:
        raise BadData(f'{where}: fields img_height, img_width != image shape {hw}')
    m = _mask(row['mask'], hw, f'{where}: field mask')
    masks = m[None] if m.any() else np.zeros((0, *hw), bool)  # (K, H, W): K = 1 union, 0 if empty
    ids = [row[k].as_py() for k in ('image_id', 'ann_id') if k in row]
    rt = row['reasoning_type'].as_py() if 'reasoning_type' in row else None
    return Sample('/'.join(map(str, [name, i, *ids])), image, query(row['text'].as_py(), f'{where}: field text'),
                  masks, *boxes_points(masks), reasoning_type=rt)

def _training_item(where, name, i, row, base):
    """A stage-1 row (solution: boxes + points in the stored image's pixels, solution_mask) or a
    stage-2 row as ReasonSeg-X train is published (solution_mask only: boxes and points come from the
    masks, method §11). Masks are per object, in the solution's order, at the image's size."""
    image = _image(row['image'].as_py(), f'{where}: field image', base)
    H, W = image.shape[:2]
    sm = getattr(row['solution_mask'], 'values', None) if 'solution_mask' in row else None
    masks = [_mask(m, (H, W), f'{where}: field solution_mask[{k}]') for k, m in enumerate(sm or [])]
    masks = np.array(masks, bool).reshape(-1, H, W)                               # (K, H, W)
    problem = query(row['problem'].as_py(), f'{where}: field problem')
    if 'solution' not in row:
        empty = [k for k, m in enumerate(masks) if not m.any()]
        if empty:
            raise BadData(f'{where}: field solution_mask[{empty[0]}] is empty (an object needs pixels)')
        return Sample(f'{name}/{i}', image, problem, masks, *boxes_points(masks))
    try:
        sol = json.loads(row['solution'].as_py())
        sol = [sol] if isinstance(sol, dict) else sol
        boxes = np.array([o['bbox_2d'] for o in sol], float).reshape(len(sol), 4)  # (K, 4)
        points = np.array([o['point_2d'] for o in sol], float).reshape(len(sol), 2)  # (K, 2)
    except Exception as e:  # noqa: BLE001
        raise BadData(f'{where}: field solution is not a JSON list of bbox_2d/point_2d ({e})') from None
    if not (np.isfinite(boxes).all() and np.isfinite(points).all()):
        raise BadData(f'{where}: field solution has a NaN or infinite coordinate')
    if np.any(boxes < 0) | np.any(boxes > [W, H] * 2) | np.any(points < 0) | np.any(points > [W, H]):
        raise BadData(f'{where}: field solution has coordinates outside the {W}x{H} image')
    if np.any(boxes[:, 2:] < boxes[:, :2]):
        raise BadData(f'{where}: field solution has an inverted box (x2 < x1 or y2 < y1)')
    if len(masks) != len(sol):
        raise BadData(f'{where}: field solution_mask has {len(masks)} masks for {len(sol)} objects')
    labels = [str(o.get('label', '')) for o in sol] if any('label' in o for o in sol) else []
    return Sample(f'{name}/{i}', image, problem, masks, boxes, points, labels)

def load_hf(path, skip_bad=False):
    """HF-style eval rows (parquet file/folder, save_to_disk folder) -> [Sample]. `mask` is the union
    of all targets: K = 1 (0 if empty), box and point from it, `bbox` unused. id name/row/image/ann."""
    return _collect(_rows(path), _hf_item, skip_bad, path)

def load_training_rows(path, skip_bad=False):
    """Stage-1 rows (problem, image, solution, solution_mask) or stage-2 rows (problem, image,
    solution_mask) -> [Sample]. "Original" IS the stored image (840x840 in stage 1): boxes/points are
    the solution's numbers as-is, masks must have its shape; img_height/img_width unused."""
    return _collect(_rows(path), _training_item, skip_bad, path)
