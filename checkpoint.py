"""checkpoint.py: atomic training checkpoints and exact resume (used by train.py).

A checkpoint is a folder: the weights (a full model dir in stage 0, adapter.safetensors in stages
1-2), prompt.txt, and trainer.pt (optimizer, step, RNG states, the run's config). It is written into
`last.tmp` and swapped in with renames, so a crash mid-write leaves the previous one intact.
Tested by: python -m pytest tests/test_train.py (kill-and-resume reproduces the uninterrupted run)
"""
import os, shutil
import numpy as np
import torch


def save(path, save_weights, opt, step, config, template):
    """save_weights(folder) writes the weights; everything else is written here."""
    tmp, old = path + '.tmp', path + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_weights(tmp)
    with open(os.path.join(tmp, 'prompt.txt'), 'w') as f:
        f.write(template)
    torch.save({'opt': opt.state_dict(), 'step': step, 'config': config, 'torch_rng': torch.get_rng_state(),
                'numpy_rng': np.random.get_state()}, os.path.join(tmp, 'trainer.pt'))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def restore(path, opt):
    """Load optimizer and RNG states in place; -> the step to continue from."""
    st = torch.load(os.path.join(path, 'trainer.pt'), weights_only=False)
    opt.load_state_dict(st['opt'])
    torch.set_rng_state(st['torch_rng'])
    np.random.set_state(st['numpy_rng'])
    print(f'[train] resumed {path} at step {st["step"]}')
    return st['step']
