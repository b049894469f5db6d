"""rollout_vllm.py: rollouts sampled by a vLLM engine instead of transformers' generate (train.py, eval.py and
predict.py --rollout vllm). The engine lives in the trainer's own process (no worker processes: scripts need no
__main__ guard; with tensor parallelism the torchrun ranks are its workers), holds the frozen base, and is handed the
current policy before each step's sampling: the LoRA adapter as a new adapter version (PEFT format, a few
files in a temporary folder). It samples what pipeline.generate samples (method §6): the same prompts token for
token, temperature and top-p only (the checkpoint's generation_config.json set aside), the same vision tokens
excluded, the same stop tokens, and returns the same pipeline.Rollouts, so the reward and the update (which
recomputes every log-prob with the policy: the first ratio is 1) are unchanged.
Identical to hf rollouts: greedy outputs and log-probs (up to float rounding). Not identical: the sampled
rollouts themselves (each row has its own seeded stream here too, but vLLM draws from it differently).
Needs the vLLM environment (requirements-vllm.txt; README "Rollouts through vLLM").
Tested by: python -m pytest tests/test_rollout_vllm.py   (skips, saying so, where vllm is not installed)
"""
import json, os, random, shutil, tempfile, weakref
import numpy as np
import torch

import data, grpo, lora, parallel, pipeline
import model as M

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the adapter ranks vLLM's LoRA kernels are built for


def row_seeds(seed, keys, n):
    """One vLLM sampling seed per row (key, k), a function of (seed, key, k) alone, as pipeline.row_uniforms:
    the rollouts do not depend on batching, chunking or ranks."""
    return [int(np.random.default_rng([seed, key, k]).integers(2 ** 63 - 1)) for key in keys for k in range(n)]


def collapse_images(ids, image_token_id):
    """(P,) prompt ids with each image's placeholder run expanded (the processor's output) -> a list with one
    placeholder per image: vLLM's own processor expands it again (Engine.generate checks the result is equal)."""
    ids = ids.tolist()
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def context_length(net, image_size, max_new_tokens, text=1024):
    """The engine's longest sequence: the image's tokens (one per 28 x 28 pixels), room for `text` prompt tokens,
    the response; within what the model's positions allow."""
    return min(net.config.get_text_config().max_position_embeddings, (image_size // 28) ** 2 + text + max_new_tokens)


class Engine:
    """A vLLM engine for `base` (a checkpoint dir), colocated with the policy `net` (its dtype; the tower and
    the LM weights of the checkpoint). memory: on a GPU the engine's share of the GPU (weights, activations and
    KV cache; the policy and its optimizer use the rest), on CPU the share of RAM given to its KV cache.
    tp: tensor-parallel size; above 1 only under torchrun, each group of tp ranks holding one engine.
    The engine serves adapters when `net` has one (of its rank; sync hands each version over), else the base.
    max_model_len: context_length(...)."""

    def __init__(self, base, net, memory=0.3, tp=1, max_model_len=4096, seed=0):
        os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')  # the engine core runs in this process
        cpu = net.device.type == 'cpu'
        if cpu:  # the engine must not pin this process's threads to cores (it would also pin the trainer's)
            os.environ.setdefault('VLLM_CPU_OMP_THREADS_BIND', 'nobind')
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(f'vllm is not importable here ({e}); README "Rollouts through vLLM" says how to '
                               'install it') from None
        distributed = int(os.environ.get('WORLD_SIZE', '1')) > 1  # torchrun's ranks (an engine may have made a
        # process group of one in this process: that is not a torchrun)
        if tp > 1 and not distributed:
            raise ValueError(f'--vllm-tp {tp}: a tensor-parallel engine needs torchrun with a multiple of {tp} '
                             'processes (each group of ranks holds one engine)')
        world = torch.distributed.get_world_size() if distributed else 1
        if world % tp:
            raise ValueError(f'--vllm-tp {tp}: must divide the number of processes ({world})')
        self.tp, self.group = tp, None
        if tp > 1:  # every rank builds every group (new_group is collective), keeps its own
            rank = torch.distributed.get_rank()
            for g in range(world // tp):
                ranks = list(range(g * tp, (g + 1) * tp))
                group = torch.distributed.new_group(ranks)
                if rank in ranks:
                    self.group = group
        cfg = net.config
        self.image_token_id = cfg.image_token_id
        self.banned = pipeline.vision_tokens(net)
        vocab = cfg.get_text_config().vocab_size
        self.allowed = [i for i in range(vocab) if i not in set(self.banned)]  # (V - 4,) what sampling may emit
        eos = net.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos)
        kw = dict(model=base, dtype=str(net.dtype).removeprefix('torch.'), seed=seed, max_model_len=max_model_len,
                  tensor_parallel_size=tp, generation_config='vllm',  # the checkpoint's sampling defaults set aside
                  limit_mm_per_prompt={'image': 1, 'video': 0}, logprobs_mode='processed_logprobs',
                  distributed_executor_backend='external_launcher' if distributed else 'uni')
        mods = lora.lora_modules(net)
        lora_rank = mods[0][1].r if mods else None
        if lora_rank:
            if lora_rank > LORA_RANKS[-1]:
                raise ValueError(f'--lora-r {lora_rank}: vLLM serves adapters up to rank {LORA_RANKS[-1]}')
            kw.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= lora_rank))
        if cpu:
            import psutil
            # The CPU build cannot rewind a seeded request's generator after a partial prefill ("CPU Generator
            # does not use offset"): every prompt is prefilled whole. Eager: compiling costs minutes on CPU.
            kw.update(kv_cache_memory_bytes=int(memory * psutil.virtual_memory().total), enforce_eager=True,
                      enable_chunked_prefill=False, max_num_batched_tokens=max_model_len)
        else:
            kw.update(gpu_memory_utilization=memory)
        # vLLM seeds the global generators and replaces torch.set_num_threads while it starts; the trainer's
        # random streams and thread setting stay as they were (a run must not depend on the rollout engine).
        states, set_threads = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), \
            torch.set_num_threads
        try:
            self.llm = LLM(**kw)
        finally:
            random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])
            torch.set_num_threads = set_threads
        self.lora, self.version, self.folder = None, 0, tempfile.mkdtemp(
            prefix='vllm_adapter_', dir='/dev/shm' if os.path.isdir('/dev/shm') else None)  # in memory where it can
        weakref.finalize(self, shutil.rmtree, self.folder, True)  # the adapter files go with the engine

    def sync(self, net):
        """Hand the engine the policy's current LoRA adapter: written in PEFT's format, loaded as the next
        adapter version (vLLM caches adapters by version). Collective under --shard (the adapter is gathered)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest
        mods = lora.lora_modules(net)
        if not mods:
            raise ValueError('Engine.sync: the policy has no LoRA adapter (--tuning full is not served by vLLM here)')
        state = parallel.full_adapter(net)  # {'<module>.lora_A': (r, in), '<module>.lora_B': (out, r)}
        self.version += 1  # every rank writes its own copy: the nodes need not share a filesystem
        folder = os.path.join(self.folder, f'v{self.version}')
        os.makedirs(folder)
        save_file({f'base_model.model.{k}.weight': v.float().contiguous() for k, v in state.items()},
                  os.path.join(folder, 'adapter_model.safetensors'))
        r, alpha = mods[0][1].r, mods[0][1].alpha
        with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
            json.dump(dict(peft_type='LORA', r=r, lora_alpha=alpha, lora_dropout=0.0, bias='none',
                           target_modules=sorted({n.rpartition('.')[2] for n, _ in mods}), use_rslora=False,
                           fan_in_fan_out=False, modules_to_save=None), f)
        if self.lora is not None:  # the engine has read the previous version: its files can go
            shutil.rmtree(self.lora.lora_path, ignore_errors=True)
        self.lora = LoRARequest(f'policy-v{self.version}', self.version, folder)

    @torch.no_grad()
    def generate(self, net, proc, samples, template, image_size, n=1, greedy=True, temperature=1.0, top_p=1.0,
                 max_new_tokens=2048, seed=0, keys=None, chunk=None, logprobs=False):
        """pipeline.generate's contract, sampled by the engine -> [pipeline.Rollouts] per sample. The vision
        tower runs once per image in `net` too: the update reuses its output (grpo.select_images). chunk: unused
        (the engine schedules its own batches, within its KV cache).
        logprobs: also -> [(n, R) fp32] per sample, the engine's log-probability of each sampled token under
        the distribution it sampled from (temperature, top-p and the excluded tokens applied), 0 past the EOS."""
        from vllm import SamplingParams
        if greedy and n != 1:
            raise ValueError('greedy decoding gives one answer per query: n must be 1')
        keys = list(range(len(samples))) if keys is None else list(keys)
        images = [data.resize_for_model(s.image, image_size) for s in samples]
        b = M.make_inputs(proc, images, [M.build_prompt(s.query, template) for s in samples]).to(net.device)
        vision = net.model.get_image_features(b['pixel_values'], b['image_grid_thw'], return_dict=True)
        prompts = [ids[m.bool()] for ids, m in zip(b['input_ids'], b['attention_mask'])]  # unpadded (P_j,)
        common = dict(max_tokens=max_new_tokens, stop_token_ids=self.eos, ignore_eos=True,  # stop as generate stops
                      allowed_token_ids=self.allowed, detokenize=False, logprobs=0 if logprobs else None)
        params = [SamplingParams(temperature=0.0, **common)] * len(samples) if greedy else \
            [SamplingParams(temperature=temperature, top_p=top_p, seed=s, **common) for s in row_seeds(seed, keys, n)]
        requests = [dict(prompt_token_ids=collapse_images(prompts[j], self.image_token_id),
                         multi_modal_data={'image': images[j]}) for j in range(len(samples)) for _ in range(n)]
        outs = self._run(requests, params)
        for i, o in enumerate(outs):
            if list(o.prompt_token_ids) != prompts[i // n].tolist():
                raise RuntimeError(f'vLLM expanded the prompt of sample {i // n} to other ids than the processor: '
                                   'the engine and transformers disagree on the image placeholders')
        pad = net.generation_config.pad_token_id
        pad = proc.tokenizer.pad_token_id if pad is None else pad
        longest = max(len(o.outputs[0].token_ids) for o in outs)
        resp = torch.full((len(outs), max(longest, 1)), pad, dtype=torch.long)  # (B*n, R)
        for i, o in enumerate(outs):
            resp[i, :len(o.outputs[0].token_ids)] = torch.tensor(o.outputs[0].token_ids, dtype=torch.long)
        resp = resp.to(net.device)
        eos = torch.isin(resp, torch.tensor(self.eos, device=resp.device))
        mask = (eos.int().cumsum(1) - eos.int()) == 0  # tokens before (and incl.) the 1st EOS, as pipeline.generate
        texts = proc.batch_decode(resp.masked_fill(~mask, pad), skip_special_tokens=True)
        rolls = [pipeline.Rollouts(prompts[j], b['image_grid_thw'][j:j + 1], grpo.select_images(vision, [j]),
                                   resp[j * n:(j + 1) * n], mask[j * n:(j + 1) * n], texts[j * n:(j + 1) * n],
                                   self.banned)
                 for j in range(len(samples))]
        if not logprobs:
            return rolls
        lp = torch.zeros(resp.shape, dtype=torch.float32)  # (B*n, R)
        for i, o in enumerate(outs):
            got = o.outputs[0]
            lp[i, :len(got.token_ids)] = torch.tensor([d[t].logprob for d, t in zip(got.logprobs, got.token_ids)])
        lp = lp.to(net.device).masked_fill(~mask, 0.0)
        return rolls, [lp[j * n:(j + 1) * n] for j in range(len(samples))]

    def _run(self, requests, params):
        """llm.generate on this rank's requests. Tensor parallel: the tp ranks of a group must submit the same
        requests, so each submits the whole group's and keeps its own share (in rank order)."""
        if self.group is None:
            return self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        parts = [None] * self.tp
        torch.distributed.all_gather_object(parts, (requests, params), group=self.group)
        outs = self.llm.generate([r for q, _ in parts for r in q], [p for _, p in parts for p in p],
                                 lora_request=self.lora, use_tqdm=False)
        me = torch.distributed.get_rank(self.group)
        start = sum(len(q) for q, _ in parts[:me])
        return outs[start:start + len(requests)]
