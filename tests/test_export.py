"""Tests for export.py on a tiny Qwen2.5-VL: the merged checkpoint, loaded by plain transformers (no
project code), gives the logits and greedy tokens of base + adapter as the project loads it, keeps the
base's exact parameter names, ships the training prompt, and bad input is refused in one line.
Run: python -m pytest -q tests/test_export.py
"""
import json, os, shutil, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import lora as L
import model as M
from sandbox import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 'locate {question} please'
torch.set_num_threads(1)


def export(*args, ok=True):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert (p.returncode == 0) == ok, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def weight_keys(folder):
    """{name: shape} over every safetensors file of a checkpoint dir (sharded or not)."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith('.safetensors'):
            with safe_open(os.path.join(folder, f), 'pt') as st:
                out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny base, a stage-2 style checkpoint folder (adapter with non-zero B + prompt.txt), the export."""
    root = tmp_path_factory.mktemp('export')
    base = tiny.build_tiny_policy(str(root / 'base'), words=[PROMPT])
    net, _ = M.load_policy(base)
    L.apply_lora(net, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # with B = 0 the adapter would be the identity and prove nothing
        for _, m in L.lora_modules(net):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    ckpt = root / 'run' / 'last'
    os.makedirs(ckpt)
    adapter = str(ckpt / 'adapter.safetensors')
    L.save_lora(net, adapter, dict(base=base, stage=2, image_size=112, coord_mode='pixel', step=3))
    (ckpt / 'prompt.txt').write_text(PROMPT)
    out = str(root / 'merged')
    export('--adapter', adapter, '--out', out)  # --model from the adapter's metadata
    return dict(base=base, adapter=adapter, out=out, root=root)


def plain_inputs(proc, template):
    """Chat-formatted image + query built with transformers calls only."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    texts = [proc.apply_chat_template([{'role': 'user', 'content': [
        {'type': 'image'}, {'type': 'text', 'text': template.replace('{question}', q)}]}],
        tokenize=False, add_generation_prompt=True) for q in ('the red cup', 'a chair')]
    proc.tokenizer.padding_side = 'left'
    return dict(proc(text=texts, images=images, padding=True, return_tensors='pt'))


def test_plain_transformers_answers_as_base_plus_adapter(setup):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    merged = AutoModelForImageTextToText.from_pretrained(setup['out']).eval()
    proc = AutoProcessor.from_pretrained(setup['out'])
    template = open(os.path.join(setup['out'], 'prompt.txt')).read()
    assert template == PROMPT  # the training checkpoint's prompt, not a default
    batch = plain_inputs(proc, template)
    adapted, _ = M.load_policy(setup['base'], adapter=setup['adapter'])
    plain_base, _ = M.load_policy(setup['base'])
    with torch.no_grad():
        got, want = merged(**batch).logits, adapted.eval()(**batch).logits
        before = plain_base.eval()(**batch).logits
    assert (want - before).abs().max() > 1e-2  # the adapter matters, so equality below means merged
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    kw = dict(max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        assert torch.equal(merged.generate(**batch, **kw), adapted.generate(**batch, **kw))


def test_checkpoint_has_the_base_keys_and_files(setup):
    base, out = setup['base'], setup['out']
    keys = weight_keys(out)
    assert keys == weight_keys(base)  # same names and shapes: no lora_A/lora_B/base.weight
    assert not any('lora' in k or '.base.' in k for k in keys)
    files = set(os.listdir(out))
    assert {'config.json', 'generation_config.json', 'tokenizer.json', 'chat_template.jinja', 'prompt.txt'} <= files
    cfg = json.load(open(os.path.join(out, 'config.json')))
    assert 'auto_map' not in cfg and cfg['architectures'] == ['Qwen2_5_VLForConditionalGeneration']
    gen = lambda d: {k: v for k, v in json.load(open(os.path.join(d, 'generation_config.json'))).items()
                     if k != 'transformers_version'}
    assert gen(out) == gen(base)
    info = json.load(open(os.path.join(out, 'export.json')))
    assert info['merged_layers'] == 4 * 7  # 4 decoder layers x q k v o gate up down
    assert (info['r'], info['alpha'], info['stage'], info['step']) == (4, 8, 2, 3)
    assert not [f for f in os.listdir(setup['root']) if '.tmp' in f]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in files}  # transformers wrote the weights 0600
    assert modes == {f: 0o666 & ~umask for f in files} and 'model.safetensors' in modes


def test_bad_input_is_refused_in_one_line(setup, tmp_path):
    garbled = tmp_path / 'garbled.safetensors'
    garbled.write_bytes(b'not a safetensors file at all')
    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'x').write_text('keep me')
    other = tiny.build_tiny_policy(str(tmp_path / 'other'), layers=2)  # 2 decoder layers, the adapter has 4
    cases = [(['--adapter', tmp_path / 'nope.safetensors', '--out', tmp_path / 'o1'], 'does not exist'),
             (['--adapter', garbled, '--out', tmp_path / 'o2'], 'not a LoRA adapter'),
             (['--adapter', setup['adapter'], '--out', busy], 'not an empty folder'),
             (['--adapter', setup['adapter'], '--model', other, '--out', tmp_path / 'o3'], 'targets differ')]
    for args, says in cases:
        p = export(*args, ok=False)
        last = p.stderr.strip().splitlines()[-1]  # (loading progress bars may come before it)
        assert last.startswith('[export] error:') and says in last and 'Traceback' not in p.stderr, p.stderr
    assert not any((tmp_path / o).exists() for o in ('o1', 'o2', 'o3'))
    assert os.listdir(busy) == ['x']


def test_unwritable_out_and_undecodable_prompt_are_one_line_before_the_merge(setup, tmp_path):
    """A file in --out's path is said before the model loads (it used to be a traceback after the merge);
    a prompt.txt beside the adapter that is not text names that file."""
    (tmp_path / 'file').write_text('x')
    p = export('--adapter', setup['adapter'], '--out', tmp_path / 'file' / 'merged', ok=False)
    assert p.stderr.strip() == f"[export] error: --out '{tmp_path / 'file' / 'merged'}': cannot write there (Not a " \
                               "directory)" and 'Loading' not in p.stderr  # no model loaded
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    shutil.copy(setup['adapter'], ckpt / 'adapter.safetensors')
    (ckpt / 'prompt.txt').write_bytes(b'\xff\xfe find: {question}')
    p = export('--adapter', ckpt / 'adapter.safetensors', '--out', tmp_path / 'o', ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"[export] error: {ckpt / 'prompt.txt'}: not UTF-8 text") and 'Traceback' not in p.stderr
    assert not (tmp_path / 'o').exists()
