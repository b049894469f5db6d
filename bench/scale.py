"""bench/scale.py: the figures at the real model's sizes, on CPU (bench/speed.py has the sandbox-scale ratios,
bench/memory.py the memory of --shard). 8 the memory of one log-prob + backward step at the real vocabulary
(lm_head in checkpointed chunks vs all logits in fp32). 9 the update step with the vision tower run once per
prompt vs once per rollout row, at Qwen2.5-VL-7B's tower. 10 bench/smoke.py at the real widths, vocabulary and
processor, one layer per tower (on a GPU, run `python -m bench.smoke` itself). A measurement, not a test:
  OMP_NUM_THREADS=1 nice -n 19 python -m bench.scale [--only logprob,vision,smoke]
"""
import re, subprocess, sys, tempfile, time
import torch

import grpo, lora
from sandbox import tiny
import model as M
from bench.speed import add, peak_mb, race, run


def narrow_policy(arch='qwen2.5-vl-7b', vocab=151936, vision=None):
    """A real configuration's classes and vocabulary, one narrow layer (hidden 128), random weights, LoRA r 8."""
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_attention_heads=1,
                num_key_value_heads=1, head_dim=128)
    d = tiny.build_config_dir(tempfile.mkdtemp(prefix='bench_'), arch, layers=1,
                              vision_layers=1 if vision is None else None,
                              text=text, vision=vision or dict(hidden_size=64, intermediate_size=128, num_heads=2,
                                                               out_hidden_size=128))
    torch.manual_seed(0)
    net, proc = M.load_model(d, random_init=True), M.load_processor(d)
    lora.apply_lora(net, r=8, alpha=8)
    return net, proc

def update_batch(proc, rows, resp, side=56):
    """rows copies of one prompt (a side² image) + resp random response tokens, as train.py's update sees them."""
    from PIL import Image
    b = M.make_inputs(proc, [Image.new('RGB', (side, side))], ['find the red cup'])
    ids = torch.cat([b['input_ids'], torch.randint(100, 1000, (1, resp))], 1).expand(rows, -1)
    mask = torch.arange(ids.shape[1]).expand(rows, -1) >= b['input_ids'].shape[1]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=mask,
                image_grid_thw=b['image_grid_thw'].expand(rows, -1), pixel_values=b['pixel_values'].repeat(rows, 1))

def straightforward_logprobs(net, batch):
    """All logits in fp32, log_softmax over the vocabulary, gather: the way that keeps (T, V) alive."""
    kw = {k: v for k, v in batch.items() if k != 'response_mask'}
    kw['mm_token_type_ids'] = (batch['input_ids'] == net.config.image_token_id).int()  # M-RoPE needs it
    logp = net(**kw).logits[:, :-1].float().log_softmax(-1).gather(-1, batch['input_ids'][:, 1:, None])[..., 0]
    return logp * batch['response_mask'][:, 1:]

def bench_logprob():
    net, proc = narrow_policy()
    batch = update_batch(proc, 1, 2048)
    step = lambda fn: fn(net, batch).sum().backward()
    ours, base = [peak_mb(lambda f=f: step(f), 'cpu') for f in (grpo.token_logprobs, straightforward_logprobs)]
    with torch.no_grad():
        same = torch.allclose(grpo.token_logprobs(net, batch)[:, 1:], straightforward_logprobs(net, batch), atol=1e-4)
    add(f'8. log-prob + backward peak memory, vocabulary 151,936, 2,048 response tokens, hidden 128 (CPU); '
        f'log-probs equal: {"yes" if same else "**no**"}', f'{ours:.0f} MB (lm_head in checkpointed 256-token chunks)',
        f'{base:.0f} MB (all logits, fp32 log_softmax)', f'{ours / base:.2f}×', '≤ 0.25×',
        ours / base <= 0.25 and same)

def bench_vision():
    vision = dict(out_hidden_size=128)  # Qwen2.5-VL-7B's vision tower as released: 32 blocks, width 1280
    net, proc = narrow_policy(vision=vision)
    rows, batch = 8, update_batch(proc, 8, 64, side=224)
    def once():  # the update's way: the tower's output from generation, shared by the rows
        with torch.no_grad():
            out = net.model.get_image_features(batch['pixel_values'][:256], batch['image_grid_thw'][:1],
                                               return_dict=True)
        cached = {k: v for k, v in batch.items() if k != 'pixel_values'}
        cached['vision'] = grpo.select_images(out, [0] * rows)
        grpo.token_logprobs(net, cached, micro_batch=rows).sum().backward()
    per_row = lambda: grpo.token_logprobs(net, batch, micro_batch=rows).sum().backward()
    (t_once, t_rows), _ = race([once, per_row], 1, warm=False)
    add(f'9. update step time, {rows} rollout rows of one 224² prompt, Qwen2.5-VL-7B vision tower (32 blocks, '
        f'width 1280), one narrow LM layer (CPU)', f'{t_once:.1f} s (tower once per prompt)',
        f'{t_rows:.1f} s (tower once per row)', f'{t_rows / t_once:.1f}×')

def bench_smoke():
    for arch in ('qwen2.5-vl-7b', 'qwen3-vl-8b'):
        cmd = [sys.executable, '-m', 'bench.smoke', '--arch', arch, '--device', 'cpu', '--layers', '1',
               '--rollouts', '2', '--group', '2', '--max-new-tokens', '8']
        t = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        steps = re.findall(r'step \d+: step ([\d.]+) s', out)
        moved = re.search(r'lora_A: ([\d.]+)% of ([\d,]+)', out)
        add(f'10. `{" ".join(cmd[1:])}`: real widths and vocabulary, 1 layer per tower (CPU)',
            f'steps {" / ".join(steps)} s, lora_A moved {moved.group(1) if moved else "?"}% ({time.time() - t:.0f} s '
            'with the random init)' if steps else '**failed**')


if __name__ == '__main__':
    run(dict(logprob=bench_logprob, vision=bench_vision, smoke=bench_smoke),
        __doc__.split(' A measurement, not a test')[0])
