"""export.py: fold a trained LoRA adapter into its base model and write a standard checkpoint directory
(docs/method.md §7): merged weights under the base's own parameter names, config, generation config,
processor, tokenizer, chat template, and prompt.txt (the template the adapter was trained with).
Plain `transformers` loads it with AutoModelForImageTextToText / AutoProcessor, no code from here.

  python export.py --adapter runs/stage2/last/adapter.safetensors --out star-merged
  python eval.py --model star-merged               # no --adapter: the adapter is in the weights now
Tested by: python -m pytest tests/test_export.py
"""
import argparse, json, os, shutil, sys
import torch
from transformers import AutoProcessor

import lora
import model as M

p = argparse.ArgumentParser(description=__doc__.split('\n')[0])  # each default is said once, in its help
p.add_argument('--adapter', required=True, help='LoRA file written by train.py (adapter.safetensors)')
p.add_argument('--model', default=None, help='base checkpoint dir (default: the base recorded in the adapter)')
p.add_argument('--out', required=True, help='new checkpoint dir (must not exist, or be empty)')
p.add_argument('--prompt-file', default=None, help='prompt template to ship (default: prompt.txt beside the '
               'adapter, else the one its training stage used)')
p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
               help="weights' dtype (default auto: the base checkpoint's); the merge itself sums in fp32")
p.error = lambda msg: p.exit(2, f'[export] error: {msg} (python export.py --help)\n')  # one line, not the usage
args = p.parse_args()


def fail(msg):
    sys.exit(f'[export] error: {msg}')


# ------------------------------------------------------------------ check everything before any work
if not os.path.isfile(args.adapter):
    fail(f'--adapter {args.adapter!r} does not exist')
try:
    state, meta = lora.read_lora(args.adapter)
except Exception as e:  # noqa: BLE001 - not safetensors, truncated, metadata not JSON
    fail(f'--adapter {args.adapter!r} is not a LoRA adapter file ({type(e).__name__}: {e})')
if not state or not {'r', 'alpha'} <= meta.keys() or not all(k.endswith(('.lora_A', '.lora_B')) for k in state):
    fail(f'--adapter {args.adapter!r} is not a LoRA adapter file (needs lora_A/lora_B tensors and r, alpha metadata)')
base = args.model or meta.get('base')
if not base:
    fail(f'--adapter {args.adapter!r} records no base model: pass --model DIR')
if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
    fail(f'--out {args.out!r} exists and is not an empty folder')
tmp = args.out.rstrip('/') + f'.tmp{os.getpid()}'  # written there, renamed at the end
try:  # a read-only place or a file in the path: said now, not after the merge
    os.makedirs(tmp)
    os.rmdir(tmp)
except OSError as e:
    fail(f'--out {args.out!r}: cannot write there ({e.strerror or e})')
beside = os.path.join(os.path.dirname(os.path.abspath(args.adapter)), 'prompt.txt')
try:
    if args.prompt_file:
        template = M.load_template(args.prompt_file)
    elif os.path.isfile(beside):  # train.py's checkpoint keeps the template it trained with
        template = open(beside).read()
    else:  # what train.py would have used for that stage: the base's prompt.txt, else ours
        template = M.load_template(f"stage{meta['stage']}" if meta.get('stage') in (1, 2) else 'eval', base)
    M.build_prompt('x', template)
    dtype = args.dtype if args.dtype == 'auto' else getattr(torch, args.dtype)
    net, _ = M.load_policy(base, dtype=dtype, adapter=args.adapter)  # refuses a base/adapter mismatch
except UnicodeDecodeError as e:  # a prompt file that is not text: name it
    fail(f'{args.prompt_file or (beside if os.path.isfile(beside) else base + "/prompt.txt")}: not UTF-8 text ({e})')
except (OSError, ValueError, RuntimeError) as e:
    fail(e)

# ------------------------------------------------------------------ merge, unwrap, save
merged = lora.merge_lora(net)  # W += B @ A * alpha / r, summed in fp32, rounded once to the weights' dtype
for name, module in lora.lora_modules(net):  # put the plain nn.Linear back: the base's parameter names
    parent, _, leaf = name.rpartition('.')
    setattr(net.get_submodule(parent), leaf, module.base)
leftover = [k for k in net.state_dict() if 'lora_' in k or '.base.' in k]
if leftover:
    fail(f'unwrapping left adapter keys behind, e.g. {leftover[0]}')

# Written into a temporary folder and renamed at the end: a crash never leaves a half checkpoint.
try:
    net.save_pretrained(tmp)  # config.json, generation_config.json, weights
    AutoProcessor.from_pretrained(base).save_pretrained(tmp)  # as stored in the base (not our left padding)
    with open(os.path.join(tmp, 'prompt.txt'), 'w') as f:
        f.write(template)
    keep = ('stage', 'step', 'image_size', 'coord_mode', 'r', 'alpha')
    with open(os.path.join(tmp, 'export.json'), 'w') as f:  # provenance: what was merged into what
        json.dump(dict(base=os.path.abspath(base), adapter=os.path.abspath(args.adapter), merged_layers=merged,
                       dtype=str(next(net.parameters()).dtype).replace('torch.', ''),
                       **{k: meta[k] for k in keep if k in meta}), f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):  # transformers writes model.safetensors 0600: readable by all, as any other file
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.isdir(args.out):
        os.rmdir(args.out)  # empty, checked above
    os.replace(tmp, args.out)
except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):  # a disk full mid-save: one line, nothing left behind
        fail(f'--out {args.out!r}: cannot write the checkpoint ({e.strerror or e}); nothing was left behind')
    raise
print(f'[export] merged {merged} LoRA layers (r={meta["r"]}, alpha={meta["alpha"]}) into {base} -> {args.out}')
