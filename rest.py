"""rest.py: REST, Rollout-Expanded Selective-Tuning (method §9). Sample N rollouts per prompt, score
them all, and train on only M of them: the M//2 best and the M - M//2 worst. A large N makes it
likelier that a hard prompt has at least one success to learn from, while the update costs the same
as plain GRPO with M rollouts.

The caller computes advantages over the kept subset only:
    idx = select(rewards, m)                                    # (B, M)
    adv = grpo.group_advantages(rewards.gather(1, idx))         # (B, M)
Tested by: python -m pytest tests/test_rest.py
"""
import torch

from grpo import group_advantages


def select(rewards, m):
    """(B, N) rewards -> (B, min(N, m)) LongTensor of the rollouts to keep, per prompt (method §9).

    N > m: the m//2 highest rewards, then the m - m//2 lowest, best first. Both halves come from one
    stable descending sort (ties: lower rollout index ranks higher), so no rollout can be picked
    twice, even when everything ties. N <= m: keep all N (there is nothing to select), in the same
    best-first order. The order never matters to the advantages; it only makes runs reproducible.
    """
    rewards = torch.as_tensor(rewards)
    n = rewards.shape[1]
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices  # (B, N) best first
    if n <= m:
        return order
    hi, lo = m // 2, m - m // 2
    return torch.cat([order[:, :hi], order[:, n - lo:]], dim=1)  # (B, m), disjoint halves


def rest_stats(rewards, idx, m, success):
    """What REST did in one step, as floats for the training log.

    rewards: (B, N) totals; idx: (B, M') from select; success: (B, N) bool "correct" rollouts
    (method §5: matched mean tier >= 2), in sampling order.
      any_success_all / any_success_first_m: fraction of prompts with at least one success among
        all N rollouts vs among the first m sampled (= what plain GRPO with m rollouts would see);
        the difference is the point of REST.
      abs_adv: mean |advantage| over the kept rollouts (advantages over the kept subset only).
      reward_gap: mean kept-top reward minus mean kept-bottom reward (halves as select orders them).
      flat_groups: fraction of prompts whose kept rewards all tie (they contribute no gradient).
      rescued: fraction of prompts whose only successes are among samples m+1..N (= any_success_all
        - any_success_first_m): the groups REST turns from all-failures into a learning signal.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    success = torch.as_tensor(success, dtype=torch.bool, device=rewards.device)
    kept = rewards.gather(1, idx)  # (B, M')
    half = kept.shape[1] // 2  # = m//2 when N > m; select puts the top half first
    gap = kept[:, :half].mean(1) - kept[:, half:].mean(1) if half else torch.zeros(len(kept))
    return {
        'rest_any_success_all': success.any(1).float().mean().item(),
        'rest_any_success_first_m': success[:, :m].any(1).float().mean().item(),
        'rest_abs_adv': group_advantages(kept).abs().mean().item(),
        'rest_reward_gap': gap.mean().item(),
        'rest_flat_groups': (kept == kept[:, :1]).all(1).float().mean().item(),
        # rescued: every success came from samples m+1..N (plain GRPO with m rollouts would have had none)
        'rest_rescued': (success.any(1) & ~success[:, :m].any(1)).float().mean().item(),
    }


def hard_prompts(success, below):
    """The curriculum of `train.py --hard-below`: (P, K) bool successes of the starting policy on P
    candidate prompts, K samples each -> LongTensor of the candidates (ascending) whose success rate
    (successes / K) is strictly below `below`. REST can only rescue a prompt whose success is rare
    (method §9); below = 1/K keeps the prompts never solved in K samples."""
    success = torch.as_tensor(success, dtype=torch.bool)
    return torch.nonzero(success.float().mean(1) < below).flatten()


def pass_at(success, k):
    """(P, K) bool successes -> the fraction of prompts with a success among their first k samples."""
    success = torch.as_tensor(success, dtype=torch.bool)
    return success[:, :k].any(1).float().mean().item() if len(success) else 0.0
