"""Test helper (tests/test_train.py): run train.py with a NaN on rank 1 only, as a numerical fault on one
GPU would give, to check that every rank stops instead of hanging in all-reduce. FAULT=loss (default): the
loss is NaN; FAULT=weights: the loss and gradient are finite but the update leaves a weight NaN."""
import os, runpy, sys
import torch

import grpo

if os.environ.get('RANK') == '1' and os.environ.get('FAULT', 'loss') == 'loss':
    real = grpo.grpo_loss
    grpo.grpo_loss = lambda *a, **k: (lambda loss, stats: (loss * torch.tensor(float('nan')), stats))(*real(*a, **k))
if os.environ.get('RANK') == '1' and os.environ.get('FAULT') == 'weights':
    step = torch.optim.AdamW.step

    def nan_step(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]['params'][0].view(-1)[0] = float('nan')
        return out
    torch.optim.AdamW.step = nan_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
