"""PPO's equations for a language model, as pure tensor functions (Schulman et al. 2017; for text, Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences", the recipe trl 0.x's PPOTrainer and the Mini-ChatGPT
tutorial follow). The rollout and optimisation loop is proxytune.preference.ppo_trainer.

One completion is an episode; a token is an action. Shapes: B completions, T completion tokens (right-padded),
`mask` (B, T) is 1 on a completion's real tokens.

    per-token reward  r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) + [t = last] * score
    TD error          delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)              (V = 0 after the last token)
    GAE advantage     A_t = sum_l (gamma * lambda)^l * delta_{t+l}             (Schulman et al. 2016)
    return            R_t = A_t + V(s_t)                                         (the value head's target)
    ratio             rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    policy loss       L_pi = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
    value loss        L_V = 1/2 mean_t max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - R_t)^2)
    loss              L = L_pi + vf_coef * L_V
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def masked_mean(values, mask):
    """Mean of `values` over the positions where `mask` is 1."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values, mask, eps: float = 1e-8):
    """(values - mean) / std over the masked positions (0 elsewhere): advantages of mean 0 and std 1 per batch."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * (var + eps).rsqrt() * mask


def token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """r_t = -kl_coef * (log pi - log pi_ref)_t, plus the sequence's score on its last real token. -> (rewards (B, T),
    per-token KL (B, T)); both 0 outside `mask`.

    scores (B,), logprobs/ref_logprobs/mask (B, T)."""
    import torch

    kl = (logprobs - ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    has_tokens = mask.sum(1) > 0
    rewards[torch.arange(len(scores)), last] += scores * has_tokens
    return rewards, kl


def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation, right to left: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma
    lambda A_{t+1}. Values past a completion's end count as 0, so an episode ends with its last real token.
    -> (advantages (B, T), returns = advantages + values (B, T)), 0 outside `mask`.

    With gamma = lambda = 1, A_t = (sum of rewards from t) - V_t: rewards [[0, 0, 1]], values 0 -> [[1, 1, 1]]."""
    import torch

    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V_{t+1}
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # a padded position passes nothing back: the episode's last real token sees V = 0 and A = 0 after it
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """The clipped surrogate: mean_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log pi - log pi_old).
    Where the ratio has left the clip range in the direction A favours, the clipped term is the max and is constant:
    that token's gradient is 0 (the update cannot profit from moving further). -> (loss, share of tokens clipped)."""
    import torch

    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """1/2 mean_t max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps_v, eps_v): the value
    head, like the policy, does not move far from where the rollout's values were."""
    import torch

    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class AdaptiveKLController:
    """beta's proportional control (Ziegler et al. 2019, sec. 2.2): e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n / horizon), n = completions in the batch. KL above the target raises beta (a stronger
    pull to the reference), below lowers it. `adaptive=False` keeps beta fixed."""

    value: float
    target: float
    horizon: float
    adaptive: bool = True

    def update(self, kl: float, n: int) -> None:
        if not self.adaptive or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon
