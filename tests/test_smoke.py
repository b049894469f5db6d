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
    # the Qwen3-VL run has no --out: its temp folder (TMPDIR here) must be gone afterwards
    keep = ['--out', str(tmp_path / 'work')] if arch == 'qwen2.5-vl-7b' else []
    cmd = [sys.executable, '-m', 'bench.smoke', '--arch', arch, '--device', 'cpu', '--width', '256', '--layers', '1',
           '--rollouts', '4', '--group', '2', '--max-new-tokens', '4', *keep]
    os.makedirs(tmp_path / 'tmp')
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '2', 'PYTHONPATH': ROOT, 'TMPDIR': str(tmp_path / 'tmp')})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    left = os.listdir(tmp_path / 'tmp')
    assert os.path.isdir(tmp_path / 'work' / 'run' / 'last') if keep else not [f for f in left if 'smoke' in f], left
    assert len(re.findall(r'\[smoke\] step \d: step [\d.]+ s', p.stdout)) == 2
    assert f'-> {tokens} image tokens' in p.stdout and f'vocabulary {vocab}' in p.stdout
    moved = re.search(r'lora_A: ([\d.]+)% of [\d,]+ entries moved.*adapters torch\.float32', p.stdout)
    assert moved and float(moved.group(1)) > 99, p.stdout[-1500:]


def test_help_texts_say_each_default_once_and_end_their_sentences(capsys, monkeypatch):
    import runpy
    monkeypatch.chdir(ROOT)
    helps = {}
    for script in ('bench.smoke', 'bench.scale', 'bench.memory', 'train.py'):
        monkeypatch.setattr(sys, 'argv', [script, '--help'])
        with pytest.raises(SystemExit) as e:
            if script.endswith('.py'):
                runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
            else:
                runpy.run_module(script, run_name='__main__')
        assert e.value.code == 0
        helps[script] = capsys.readouterr().out
    for script, text in helps.items():
        for option in text.split('\n  -')[1:]:  # each option's entry says its default at most once
            assert option.count('(default') <= 1, (script, option)
    for script in ('bench.scale', 'bench.memory'):  # their descriptions stopped mid-sentence at the first line
        description = ' '.join(helps[script].split()).split('options:')[0]
        assert description.rstrip().endswith('.') and 'A measurement' not in description, description[-80:]
    assert 'gives SAM and the update real work and every group a spread of rewards.' in ' '.join(
        helps['bench.smoke'].split())
    assert "(default: vit_h on a GPU, none on CPU)" in ' '.join(helps['bench.smoke'].split())
    assert '(default: vit_h)' not in helps['bench.smoke']
    epilog = helps['train.py'].split('\nstages:\n')[1].splitlines()
    stages = [line for line in epilog if line.startswith('  stage ')]
    assert [line.split()[1] for line in stages] == ['0', '1', '2']  # the epilog: one line per stage
