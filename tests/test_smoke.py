"""bench/smoke.py end to end on CPU: two stage-2 REST steps of the Qwen2.5-VL-7B and Qwen3-VL-8B
configurations (the real vocabulary, processor settings and image tokens: 840² -> 900 for Qwen2.5-VL,
832² -> 676 for Qwen3-VL), narrowed to hidden 256 and one layer per tower so that it takes seconds.
bench/scale.py runs the same at the real widths. A bf16 adapter or an off-device tensor would show here.
Run: python -m pytest -q tests/test_smoke.py
"""
import os, re, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('arch, tokens, vocab', [('qwen2.5-vl-7b', 900, '152,064'), ('qwen3-vl-8b', 676, '151,936')])
def test_smoke_two_rest_steps_move_the_adapter(arch, tokens, vocab, tmp_path):
    cmd = [sys.executable, '-m', 'bench.smoke', '--arch', arch, '--device', 'cpu', '--width', '256', '--layers', '1',
           '--rollouts', '4', '--group', '2', '--max-new-tokens', '4', '--out', str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '2', 'PYTHONPATH': ROOT})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert len(re.findall(r'\[smoke\] step \d: step [\d.]+ s', p.stdout)) == 2
    assert f'-> {tokens} image tokens' in p.stdout and f'vocabulary {vocab}' in p.stdout
    moved = re.search(r'lora_A: ([\d.]+)% of [\d,]+ entries moved.*adapters torch\.float32', p.stdout)
    assert moved and float(moved.group(1)) > 99, p.stdout[-1500:]
