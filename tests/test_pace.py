"""Tests of pace.py (a run's speed against its first steps) and of train.py's one warning when its steps
slow down (a busy machine), with a clock that only moves inside generation, 100x faster from step 6 on.
Run: python -m pytest -q tests/test_pace.py
"""
import os, re, runpy, sys, time
import pytest
import torch

import pace, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'sandbox', 'stage0')


def test_pace_and_slowdown_hand_computed():
    assert pace.pace(6.0, 40) == 0.15 and pace.pace(1.0, 0) == 1.0  # an empty step counts one decoding step
    # step 1 warms up (ignored); reference = median(1, 1.2, 0.8) = 1; the last 2 must both be >= 3x
    assert pace.slowdown([9, 1, 1.2, 0.8, 3.1, 4]) == pytest.approx(3.1)
    assert pace.slowdown([9, 1, 1.2, 0.8, 3.1, 2.9]) is None      # one slow step is noise
    assert pace.slowdown([9, 1, 1.2, 0.8, 1.0, 1.1]) is None
    assert pace.slowdown([9, 1, 1.2, 0.8, 30]) is None            # too few steps to tell
    assert pace.slowdown([1, 2, 2, 2, 5, 8], factor=2.5) == 2.5


def test_train_warns_once_when_its_steps_slow_down(tmp_path, monkeypatch, capsys):
    generate, clock = pipeline.generate, dict(calls=0, now=0.0)

    def busy(*a, **k):  # a clock that only moves in generation: 1 s a step, 100 s from step 6 on (the
        out = generate(*a, **k)  # machine's real load, whatever it is, cannot move it)
        clock['calls'] += 1
        clock['now'] += 100.0 if clock['calls'] >= 6 else 1.0
        return out
    monkeypatch.setattr(pipeline, 'generate', busy)
    monkeypatch.setattr(time, 'time', lambda: clock['now'])
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, 'argv', ['train.py', '--stage', '1', '--model', BASE, '--preset', 'sandbox',
                                      '--batch', '1', '--group', '2', '--rollouts', '2', '--lora-r', '2',
                                      '--lora-alpha', '4', '--max-new-tokens', '8', '--eval-every', '0', '--steps', '8',
                                      '--threads', '2', '--out', str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    # tqdm moves the cursor over bars that earlier in-process runs left open: drop its escape sequences
    said = [re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', line) for line in err.splitlines() if 'oversubscribed' in line]
    assert len(said) == 1 and said[0].startswith('[train] WARNING: step 7 ran ')  # once, at the 2nd slow step
    assert '--threads 1' in said[0]  # 2 threads on a CPU: the advice, with the measured gain
