"""Test helper (tests/test_train.py): run train.py with a NaN loss on rank 1 only, as a numerical
fault on one GPU would give, to check that every rank stops instead of hanging in all-reduce."""
import os, runpy, sys
import torch

import grpo

if os.environ.get('RANK') == '1':
    real = grpo.grpo_loss
    grpo.grpo_loss = lambda *a, **k: (lambda loss, stats: (loss * torch.tensor(float('nan')), stats))(*real(*a, **k))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
