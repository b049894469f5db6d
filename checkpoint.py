"""checkpoint.py: atomic training checkpoints and exact resume (used by train.py).

A checkpoint is a folder: the weights (a full model dir in stage 0, adapter.safetensors in stages
1-2), prompt.txt, train_config.json (the run's flags: --resume compares them) and trainer.pt (optimizer,
step, RNG states, the config), written last, so its presence marks the folder complete. A save writes
`last.tmp`, moves `last` to `last.old`, renames `last.tmp` to `last` and deletes `last.old`; a kill
anywhere in between leaves a complete folder under one of the three names, and `recover` (the trainer
alone) puts the newest one back as `last`. Under
--shard the adapter and optimizer state are gathered whole first (save_adapter), so the files are the
same whatever the number of ranks, and restore cuts them back into this rank's shards. One trainer
per output folder (`lock`); readers (eval.py, predict.py) only `find`, never repair.
Tested by: python -m pytest tests/test_train.py -k "resume or checkpoint"; tests/test_shard.py
"""
import json, os, shutil, sys
import numpy as np
import torch

import parallel

CONFIG_FILE, LOCK_FILE = 'train_config.json', 'train.lock'
# Flags a resumed run may change: how long, where and how fast it runs, not what a step computes (a changed
# --lr is said; stage 0's cosine schedule spans --steps, so there a new --steps stretches it).
FREE = ('resume', 'steps', 'lr', 'out', 'device', 'threads', 'save_every', 'eval_every', 'eval_n', 'micro_batch',
        'gen_chunk', 'shard', 'skip_bad', 'vllm_memory', 'vllm_tp')


def complete(folder):
    return os.path.isfile(os.path.join(folder, 'trainer.pt'))


def save(path, save_weights, opt, step, config, template):
    """save_weights(folder) writes the weights; everything else is written here. opt: the optimizer,
    or its state dict gathered whole beforehand (a --shard run: parallel.full_optimizer_state)."""
    tmp, old = path + '.tmp', path + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        save_weights(tmp)
        with open(os.path.join(tmp, 'prompt.txt'), 'w') as f:
            f.write(template)
        with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
            json.dump(config, f, indent=1)
        state = {'opt': opt if isinstance(opt, dict) else opt.state_dict(), 'step': step, 'config': config,
                 'torch_rng': torch.get_rng_state(), 'numpy_rng': np.random.get_state()}
        torch.save(state, os.path.join(tmp, 'trainer.pt.part'))
        os.replace(os.path.join(tmp, 'trainer.pt.part'), os.path.join(tmp, 'trainer.pt'))  # now complete
    except OSError as e:  # disk full, unwritable: the half-written copy goes, `path` is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f'cannot write the checkpoint {tmp}: {e.strerror or e}; {path} is untouched') from None
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


def find(path):
    """Read-only: the complete checkpoint among `path`, `path.tmp`, `path.old` (recover's order), else
    None. Readers (eval.py, predict.py, a later stage) use it: they never rename anything in a run."""
    return next((c for c in (path, path + '.tmp', path + '.old') if complete(c)), None)


def check_folder(path):
    """A checkpoint name taken by a file, or a `path` folder with files but no trainer.pt (its step and
    optimizer state are gone: it cannot be continued exactly), is a ValueError: never a restart over it."""
    for c in (path, path + '.tmp', path + '.old'):
        if os.path.exists(c) and not os.path.isdir(c):
            raise ValueError(f'{c} is a file, not a checkpoint folder: move it away or pass another --out')
    held = sorted(os.listdir(path)) if os.path.isdir(path) and not complete(path) else []
    if held:
        raise ValueError(f'{path} holds {", ".join(held[:3])} but no trainer.pt (its step and optimizer state): '
                         'it can be neither continued nor overwritten; move it away or pass another --out')


def check_config(path, config, skip=()):
    """--resume: the flags of the run whose checkpoint `path` holds (or its .tmp / .old) against `config`;
    one that changes what a step computes (all but FREE and `skip`) is a ValueError naming it and both
    values. Flags the checkpoint does not record are not compared."""
    folder = find(path)
    if folder is None:
        return
    file = os.path.join(folder, CONFIG_FILE)
    try:
        with open(file) as f:
            saved = json.load(f)
    except FileNotFoundError:  # a checkpoint written before train_config.json
        saved = load_state(folder).get('config', {})
    except ValueError as e:
        raise ValueError(f'{file}: not JSON ({e})') from None
    diff = [k for k in saved if k in config and k not in FREE and k not in skip and saved[k] != config[k]]
    if diff:
        flag = lambda k: '--' + k.replace('_', '-')  # noqa: E731
        more = f' (also {", ".join(map(flag, diff[1:]))})' if diff[1:] else ''
        raise ValueError(f'--resume with {flag(diff[0])} {config[diff[0]]} but the checkpoint in {folder} was '
                         f'trained with {flag(diff[0])} {saved[diff[0]]}{more}: a resumed run keeps every flag that '
                         'changes its steps (--steps, --lr, --save-every, --threads, --device may change); '
                         'pass the same value, or a new --out')


def check_space(folder, need):
    """A save writes the new checkpoint beside the last one: refuse now, not at the first save, when the
    filesystem of `folder` has less than `need` bytes free (OSError, one line)."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(f'--out {folder}: {free / 2 ** 20:,.0f} MiB free, a checkpoint needs about '
                      f'{need / 2 ** 20:,.0f} MiB')


def _started(pid):
    """A process's start time in clock ticks since boot (/proc), which tells a reused PID; None elsewhere."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rpartition(')')[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder):
    pid = holder.get('pid')
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():  # a restarted container reuses its PIDs
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return holder.get('started') is None or _started(pid) in (None, holder['started'])


def lock(folder):
    """One trainer per output folder: folder/train.lock, created exclusively, holds this process's PID,
    host and start time, and goes at exit. A lock left on this host by a process that is gone (killed -9,
    a node reboot) is taken over, and said; a live holder, or one on another host (which cannot be
    checked from here), is a RuntimeError naming it. -> the lock's path."""
    import atexit, socket, time
    path, host = os.path.join(folder, LOCK_FILE), socket.gethostname()
    me = dict(pid=os.getpid(), host=host, started=_started(os.getpid()), since=time.strftime('%Y-%m-%d %H:%M:%S'))
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):  # being written by a run starting this very moment: look again
                time.sleep(0.5)
                continue
            who = f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            if holder.get('host') != host or _alive(holder):
                raise RuntimeError(f'{folder} is in use by another training run ({who}, lock {path}): one run '
                                   'per --out; if that run is gone, delete the lock file')
            print(f'[train] taking over the lock of a run that is gone ({who})')
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        atexit.register(_unlock, path, me['pid'])
        return path
    raise RuntimeError(f'{path}: unreadable lock file (not JSON); if no run uses {folder}, delete it')


def _unlock(path, pid):
    try:
        with open(path) as f:
            mine = json.load(f).get('pid') == pid
        if mine:
            os.remove(path)
    except (OSError, ValueError):
        pass


def run_folder(folder):
    """The training run `folder` lies in (itself or a folder above it holds a lock or a complete
    checkpoint), else None: eval.py and predict.py never write there."""
    d = os.path.abspath(folder)
    while True:
        if os.path.isfile(os.path.join(d, LOCK_FILE)) or any(complete(os.path.join(d, n)) for n in
                                                             ('', 'last', 'last.tmp', 'last.old')):
            return d
        if os.path.dirname(d) == d:
            return None
        d = os.path.dirname(d)


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
    """Keep the records of log.jsonl up to `step` (a resumed run rewrites the steps after it; a run that
    starts at step 0 rewrites them all, so the records of a run killed before its first checkpoint go),
    so the log holds one record per step. A line that is not a JSON record (cut by a kill, garbled) is
    dropped with a warning naming the file and line. Written to a temp file, then renamed."""
    if not os.path.isfile(log_path):
        return
    keep, dropped = [], 0
    with open(log_path) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line) if line.endswith('\n') else None
                s = rec['step'] if isinstance(rec, dict) else None
            except ValueError:
                s = None
            if not isinstance(s, (int, float)):
                print(f'[train] warning: {log_path} line {n}: not a JSON step record, skipped: {line[:60]!r}')
            elif 0 < step and s <= step:
                keep.append(line)
            else:
                dropped += 1
    if dropped and step == 0:
        print(f'[train] {log_path}: {dropped} record(s) of an earlier run that saved no checkpoint removed')
    with open(log_path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(log_path + '.tmp', log_path)
