"""inference.py: a trained checkpoint, ready to answer: what eval.py and predict.py share. resolve() picks
the base and adapter (checked before anything loads), load() builds the policy, segmenter, prompt, input
size and coordinate mode from the flags, else the training metadata the checkpoint recorded, and
combine() turns the segmented answers of one query into one mask (greedy, or mask voting, method §10).
Tested by: python -m pytest tests/test_predict.py tests/test_update.py tests/test_eval.py
"""
import json, os, sys
import numpy as np
import torch

import checkpoint, lora, parallel, update, vis, vote
import model as M
import segment as S

SANDBOX_BASE, SANDBOX_THREADS, SANDBOX_NEW_TOKENS = 'sandbox/stage0', 1, 160
# Rows (queries x samples) per generate call with a real model (--gen-chunk): the KV cache of a 7B row of ~3,000
# tokens is ~0.17 GB (28 layers x 4 KV heads x 128 x 2 x bf16 per token), so 64 rows take ~11 GB beside 15 GB of
# weights on an 80 GB GPU, where eval.py --vote 32 --batch 8 in one call (256 rows) would not fit.
GEN_CHUNK = 64
# The most an integer flag of eval.py / predict.py may ask (--help says it): past it a value cannot fit a machine.
MOST = {'--vote': 1024, '--batch': 4096, '--max-new-tokens': 32768, '--image-size': 3584, '--threads': 1024,
        '--seed': 2 ** 32 - 1, '--vis-n': 10 ** 6, '--limit': 10 ** 4,
        '--gen-chunk': 1 << 16, '--vllm-tp': 1024}  # --limit: the synthetic test is built in memory


def limits_help(*flags):
    return 'integer flags are at most: ' + '; '.join(f'{k} {MOST[k]:,}' for k in flags)


def check_ints(tool, values):
    """[(flag, value or None, least[, most])] -> the first value outside [least, most (default MOST[flag])]
    is one line and an exit."""
    for flag, value, least, *most in values:
        most = most[0] if most else MOST[flag]
        if value is not None and not least <= value <= most:
            fail(tool, f'{flag} {value}: must be ' + (f'>= {least}' if value < least else f'<= {most:,}'))


def check_out(tool, folder, flag='--out'):
    """An output folder of eval.py / predict.py: never inside a training run (its trainer owns that folder),
    and writable (created now, a file written and removed): one line before any model loads."""
    run = checkpoint.run_folder(folder)
    if run:
        fail(tool, f'{flag} {folder}: inside the training run {run} ({tool}.py never writes into a training folder)')
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write-test-{os.getpid()}')
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        fail(tool, f'{flag} {folder}: cannot write there ({e.strerror or e})')


def vllm_engine(tool, pol, base, adapter, share, tp, max_new_tokens, seed):
    """--rollout vllm for eval.py / predict.py: an engine (rollout_vllm.Engine) holding `base`, handed the adapter
    once when there is one; its errors are one line. share: the GPU share, None for the default (0.5 on a GPU,
    0.05 of the RAM on a CPU)."""
    import rollout_vllm  # only here: vLLM lives in its own environment
    net = pol['net']
    try:
        engine = rollout_vllm.Engine(base, net, share or (0.5 if net.device.type == 'cuda' else 0.05), tp,
                                     rollout_vllm.context_length(net, pol['image_size'], max_new_tokens), seed)
        if adapter:
            engine.sync(net)
    except (OSError, ValueError, RuntimeError) as e:
        fail(tool, f'--rollout vllm: {e}')
    return engine


def fail(tool, msg):
    sys.exit(f'[{tool}] error: {msg}')


def resolve(model, adapter, tool='eval'):
    """Which base and adapter to run, checked before anything loads -> (base, adapter, the training
    metadata: the adapter's, else the train_meta.json of a fully tuned checkpoint given as --model).
    Without --model (the sandbox): the newest runs/stage2, else runs/stage1 adapter (else none), on
    the base its metadata names, else sandbox/stage0."""
    if model is None and adapter is None:
        for k in (2, 1):
            found = checkpoint.find(f'runs/stage{k}/last')  # read only: a save in progress is left alone
            if found and os.path.isfile(os.path.join(found, 'adapter.safetensors')):
                adapter = os.path.join(found, 'adapter.safetensors')
                break
            if os.path.isdir(f'runs/stage{k}'):
                print(f'[{tool}] note: runs/stage{k} has no last/adapter.safetensors (stage not finished?)')
    meta = {}
    if adapter is not None:
        if not os.path.isfile(adapter):
            fail(tool, f'--adapter {adapter}: no such file')
        try:  # refuses a truncated or garbled file and NaN/inf tensors
            meta = lora.read_lora(adapter)[1]
        except ValueError as e:
            fail(tool, f'--adapter: {e}')
    own = os.path.join(model or '', update.META_FILE)
    if adapter is None and model and os.path.isfile(own):  # train.py --tuning full wrote this checkpoint
        try:
            meta = json.load(open(own))
        except ValueError as e:
            fail(tool, f'--model: {own} is not JSON ({e})')
    base = model or meta.get('base') or SANDBOX_BASE
    if not os.path.isfile(os.path.join(base, 'config.json')):
        fail(tool, f'--model {base}: not a checkpoint directory (no config.json)' if model else
             f'no sandbox base at {base}: run `python train.py --stage 0` first, or pass --model DIR')
    return base, adapter, meta


def load(tool, base, adapter, meta, device, image_size=None, coord_mode=None, prompt_file=None, sam=None,
         sam_type='vit_h', threads=None, sandbox=True, shard=False):
    """-> dict(net, proc, seg, template, image_size, coord_mode). Input side and coordinate mode come
    from the flags, else the training metadata (resolve), else the processor / model type; the prompt
    from --prompt-file, else the base's prompt.txt, else our eval template, label-free when the model
    was trained with --no-label. In the sandbox the
    CPU thread count is fixed (SANDBOX_THREADS unless `threads`): same command, same numbers, and two
    jobs on two cores do not slow each other down tenfold. shard (eval.py --shard, under torchrun): the
    model comes sharded, each rank having read only its slices (parallel.load_sharded)."""
    if threads or (sandbox and str(device) == 'cpu'):
        torch.set_num_threads(threads or SANDBOX_THREADS)
    try:
        if shard:  # never the whole model on a rank: the adapter wrapped before sharding, loaded after
            state, info = lora.read_lora(adapter) if adapter else (None, {})
            wrap = (lambda n: lora.apply_lora(n, r=info['r'], alpha=info['alpha'])) if adapter else None
            net, proc = parallel.load_sharded(base, None, device, wrap, lora.initial), M.load_processor(base)
            if adapter:
                lora.load_lora(net, state)
        else:
            net, proc = M.load_policy(base, device=device, adapter=adapter)
    except Exception as e:  # noqa: BLE001 - a bad checkpoint / adapter becomes one line
        fail(tool, f'cannot load {base}' + (f' with {adapter}' if adapter else '') + f': {type(e).__name__}: {e}')
    size = image_size or meta.get('image_size') or M.default_image_size(proc)
    unit = getattr(proc.image_processor, 'patch_size', 14) * getattr(proc.image_processor, 'merge_size', 2)
    if size % unit:
        fail(tool, f'--image-size {size}: must be a multiple of {unit} (one visual token) for this model')
    try:
        template = M.load_template(prompt_file or M.template_name('eval', meta.get('label', True)), base)
        seg = S.load_segmenter(sam, sam_type, device) if sam else S.ColorSegmenter()
    except Exception as e:  # noqa: BLE001
        fail(tool, str(e))
    return dict(net=net, proc=proc, seg=seg, template=template, image_size=size,
                coord_mode=coord_mode or meta.get('coord_mode') or M.default_coord_mode(net))


def combine(answers, n, agg='best', shape=None):
    """The segmented answers of one query (pipeline.segment_answers) -> (mask (H, W) bool, layers
    to draw (vis.layer), vote clusters, reason). One answer alone is greedy: the union of its objects;
    otherwise the first n vote (method §10; unparsable abstains, [] votes "no object")."""
    if len(answers) == 1:
        objs, masks, _ = answers[0]
        pred = masks.any(0) if len(masks) else np.zeros(shape, bool)
        return pred, [vis.layer(m, True, o) for m, o in zip(masks, objs or [])], [], ''
    votes = [None if o is None else [(m, s, x['label']) for x, m, s in zip(o, ms, ss)]
             for o, ms, ss in answers[:n]]
    pred, clusters, reason = vote.majority_vote(votes, agg=agg, shape=shape)
    layers = []
    for c in clusters:  # a cluster is drawn by its first member: that answer's mask and box
        j, k = c['members'][0]
        layers.append(vis.layer(answers[j][1][k], c['kept'], answers[j][0][k], c['votes']))
    return pred.cpu().numpy(), layers, clusters, reason
