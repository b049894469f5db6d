"""checkpoint.py: atomic training checkpoints and exact resume (used by train.py).

A checkpoint is a folder: the weights (a full model dir in stage 0, adapter.safetensors in stages
1-2), prompt.txt, and trainer.pt (optimizer, step, RNG states, the run's config), written last, so
its presence marks the folder complete. A save writes `last.tmp`, moves `last` to `last.old`,
renames `last.tmp` to `last` and deletes `last.old`; a kill anywhere in between leaves a complete
folder under one of the three names, and `recover` puts the newest one back as `last`. Under
--shard the adapter and optimizer state are gathered whole first (save_adapter), so the files are the
same whatever the number of ranks, and restore cuts them back into this rank's shards.
Tested by: python -m pytest tests/test_train.py -k "resume or checkpoint"; tests/test_shard.py
"""
import json, os, shutil, sys
import numpy as np
import torch

import parallel


def complete(folder):
    return os.path.isfile(os.path.join(folder, 'trainer.pt'))


def save(path, save_weights, opt, step, config, template):
    """save_weights(folder) writes the weights; everything else is written here. opt: the optimizer,
    or its state dict gathered whole beforehand (a --shard run: parallel.full_optimizer_state)."""
    tmp, old = path + '.tmp', path + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_weights(tmp)
    with open(os.path.join(tmp, 'prompt.txt'), 'w') as f:
        f.write(template)
    state = {'opt': opt if isinstance(opt, dict) else opt.state_dict(), 'step': step, 'config': config,
             'torch_rng': torch.get_rng_state(), 'numpy_rng': np.random.get_state()}
    torch.save(state, os.path.join(tmp, 'trainer.pt.part'))
    os.replace(os.path.join(tmp, 'trainer.pt.part'), os.path.join(tmp, 'trainer.pt'))  # now complete
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(path, net, opt, meta, config, template, write=True):
    """A stage 1-2 checkpoint: the LoRA adapter (its metadata `meta`, meta['step'] the step) and the
    optimizer state. Under --shard every rank must call it: the adapter and AdamW's moments are gathered
    whole (a run on any number of ranks, sharded or not, resumes from them); the rank with `write` writes."""
    import lora
    state, opt_state = parallel.full_adapter(net), parallel.full_optimizer_state(opt)
    if write:
        save(path, lambda d: lora.save_lora(net, os.path.join(d, 'adapter.safetensors'), meta, state), opt_state,
             meta['step'], config, template)


def prepare(path, resume, rank):
    """Before anything loads: rank 0 repairs an interrupted save (recover), then every rank looks.
    -> whether `path` holds a checkpoint to continue; a checkpoint without --resume, or ranks that disagree
    (several nodes whose --out is not on one shared filesystem), is one line and an exit."""
    out = os.path.dirname(path)
    if rank == 0:
        recover(path)
    parallel.barrier()
    found = complete(path)
    if len(set(parallel.gather_objects(found))) > 1:
        sys.exit(f'[train] error: {path} is seen by some ranks and not by others: on several nodes --out must be '
                 'on a filesystem they all share')
    if resume and not found:  # train.py checks this before any work; here: a rank that sees none
        sys.exit(f'[train] error: --resume: no checkpoint in {out} to continue')
    elif found and not resume:
        sys.exit(f'[train] error: {out} already holds a checkpoint: --resume continues it, --out DIR starts anew')
    return found


def recover(path):
    """-> `path` if it holds a complete checkpoint after repairing an interrupted save (the newer of
    `path.tmp` and `path.old` becomes `path`), else None."""
    if not complete(path):
        for candidate in (path + '.tmp', path + '.old'):  # .tmp was being installed: it is the newer one
            if complete(candidate):
                shutil.rmtree(path, ignore_errors=True)
                os.replace(candidate, path)
                print(f'[train] {path} was left half-saved by an interrupted run: restored it from {candidate}')
                break
    return path if complete(path) else None


def load_state(path):
    """trainer.pt of a checkpoint folder -> its dict; a damaged file is a ValueError naming it."""
    file = os.path.join(path, 'trainer.pt')
    try:
        return torch.load(file, weights_only=False, map_location='cpu')
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage bytes, wrong pickle...
        raise ValueError(f'{file}: unreadable ({type(e).__name__}: {e})') from None


def restore(path, opt, lr=None):
    """Optimizer and RNG states of a checkpoint, in place; -> (step to continue from, saved config).
    lr: the learning rate to use from here on (a changed --lr wins over the saved one, and is said)."""
    st = load_state(path)
    try:
        opt.load_state_dict(parallel.shard_optimizer_state(st['opt'], opt))  # --shard: this rank's part
    except (ValueError, KeyError) as e:
        raise ValueError(f'{path}/trainer.pt: optimizer state does not fit this model ({e})') from None
    torch.set_rng_state(st['torch_rng'])
    np.random.set_state(st['numpy_rng'])
    saved_lr = opt.param_groups[0]['lr']
    if lr is not None and lr != saved_lr:
        print(f'[train] --lr {lr} replaces the checkpoint\'s lr {saved_lr}')
        for group in opt.param_groups:
            group['lr'] = lr
    print(f'[train] resumed {path} at step {st["step"]} (lr {opt.param_groups[0]["lr"]})')
    return st['step'], st.get('config', {})


def truncate_log(log_path, step):
    """Keep the records of log.jsonl up to `step` (a resumed run rewrites the steps after it), so
    the log holds one record per step. Written to a temp file, then renamed."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        keep = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= step]
    with open(log_path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(log_path + '.tmp', log_path)
