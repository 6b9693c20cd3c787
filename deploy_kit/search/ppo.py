"""PPO actor-critic over the per-layer codes.

An episode walks the searched layers in forward order; at each layer the agent sees that layer's
histogram state plus the codes it chose for the previous layer (so later choices can compensate
for earlier ones) and samples t1, t2, v1, v2 in dependency order, each from a 256-way head whose
logits are masked to the legal range given the codes already drawn. The whole episode is scored
once (one reward evaluation) and every step of it shares that return.

The heads start from a prior: a Gaussian bump (in logit space) around the histogram-based
initial codes, of width `prior_width`·tmax. Without it the first few hundred samples are
uniform over a space of ~10⁸ tuples per layer; with it, the agent starts where a good answer is
likely and PPO moves the bump (see benchmarks/README.md for the ablation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploy_kit.errors import ConfigError
from deploy_kit.lut import LayerLUT
from deploy_kit.search.space import NUM_CODES, SAMPLE_ORDER, CodeSpace, action_masks, range_mask
from deploy_kit.search.state import LayerState
from deploy_kit.search.trace import Trace

NEG = -1e9  # masked logit: exp() underflows to exactly 0


@dataclass(frozen=True)
class PPOConfig:
    episodes_per_update: int = 16
    epochs: int = 4
    lr: float = 3e-3
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    hidden: int = 64
    prior_width: float = 0.05  # 0 disables the histogram prior; 0.05 beat 0.15 and 0 (benchmarks/README.md)

    def __post_init__(self):
        if self.episodes_per_update < 2 or self.epochs < 1 or self.lr <= 0 or self.prior_width < 0:
            raise ConfigError(f"bad PPO settings {asdict(self)}: need episodes_per_update >= 2, epochs >= 1, "
                              "lr > 0, prior_width >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class ActorCritic(nn.Module):
    """Shared state encoder; categorical heads that also see the actions drawn before them at the
    same step; a critic. The LUT search uses four 256-way code heads (the default); the channel
    pruner (deploy_kit/prune/agent.py) one head over keep-ratio bins."""

    def __init__(self, state_dim: int, hidden: int, n_heads: int = len(SAMPLE_ORDER), n_actions: int = NUM_CODES):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden + n_heads - 1, n_actions) for _ in range(n_heads))
        self.critic = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        for head in self.heads:  # start at the prior: learned logits begin near zero
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def head_logits(self, h: torch.Tensor, i: int, earlier: torch.Tensor) -> torch.Tensor:
        """Logits of head i; `earlier` [M, 3] holds the codes drawn before it /255, zeros after."""
        return self.heads[i](torch.cat([h, earlier], dim=-1))


def _earlier(actions: torch.Tensor, i: int) -> torch.Tensor:
    """Teacher-forced conditioning of head i: the first i stored codes /255, the rest zero."""
    cond = torch.zeros(*actions.shape[:-1], len(SAMPLE_ORDER) - 1)
    cond[..., :i] = actions[..., :i].float() / (NUM_CODES - 1)
    return cond


def code_prior(states: list[LayerState], width: float) -> torch.Tensor:
    """[L, 4, 256] logit bias: −½((c − init)/σ)² with σ = max(2, width·tmax); zeros if width = 0."""
    c = torch.arange(NUM_CODES, dtype=torch.float32)
    out = torch.zeros(len(states), len(SAMPLE_ORDER), NUM_CODES)
    if width == 0:
        return out
    for l, s in enumerate(states):
        sigma = max(2.0, width * s.tmax)
        for i, f in enumerate(SAMPLE_ORDER):
            out[l, i] = -0.5 * ((c - getattr(s.init, f)) / sigma) ** 2
    return out


class RunningNorm:
    """Mean/std of every reward seen so far: keeps the critic's targets on one scale across updates."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: np.ndarray) -> None:
        for x in xs:
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self.m2 += d * (x - self.mean)

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        std = np.sqrt(self.m2 / self.n) if self.n > 1 else 1.0
        return (xs - self.mean) / (std + 1e-8)


class PPOAgent:
    def __init__(self, states: list[LayerState], space: CodeSpace, cfg: PPOConfig, seed: int):
        torch.manual_seed(seed)
        self.states, self.space, self.cfg = states, space, cfg
        self.static = torch.from_numpy(np.stack([s.features for s in states]))  # [L, F]
        self.tmax = torch.tensor([s.tmax for s in states])
        self.prior = code_prior(states, cfg.prior_width)
        self.net = ActorCritic(self.static.shape[1] + len(SAMPLE_ORDER), cfg.hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.norm = RunningNorm()

    # ---- acting ---------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, n: int):
        """Sample n episodes: observations [n, L, D], actions [n, L, 4] (SAMPLE_ORDER), log-probs [n, L]."""
        obs, acts, logps = [], [], []
        prev = torch.zeros(n, len(SAMPLE_ORDER))
        for l in range(len(self.states)):
            o = torch.cat([self.static[l].expand(n, -1), prev], dim=1)
            h = self.net.encoder(o)
            tmax = self.tmax[l].expand(n)
            a = torch.zeros(n, len(SAMPLE_ORDER), dtype=torch.long)
            logp = torch.zeros(n)
            for i, f in enumerate(SAMPLE_ORDER):
                codes = dict(zip(SAMPLE_ORDER[:i], a[:, :i].unbind(1)))
                mask = range_mask(*self.space.bounds(f, codes, tmax))
                logits = (self.net.head_logits(h, i, _earlier(a, i)) + self.prior[l, i]).masked_fill(~mask, NEG)
                lp = F.log_softmax(logits, dim=-1)
                a[:, i] = torch.multinomial(lp.exp(), 1, generator=self.gen).squeeze(1)
                logp += lp.gather(1, a[:, i:i + 1]).squeeze(1)
            obs.append(o)
            acts.append(a)
            logps.append(logp)
            prev = a.float() / self.tmax[l]
        return torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(logps, 1)

    def candidates(self, actions: torch.Tensor) -> list[dict[str, LayerLUT]]:
        out = []
        for ep in actions.tolist():
            out.append({s.name: LayerLUT(t1=a[0], v1=a[2], t2=a[1], v2=a[3], tmax=s.tmax) for s, a in zip(self.states, ep)})
        return out

    # ---- learning -------------------------------------------------------------------------
    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor, layer: torch.Tensor):
        """Log-prob, entropy and value of stored steps, all heads at once (no per-sample loop)."""
        h = self.net.encoder(obs)
        masks = action_masks(self.space, actions, self.tmax[layer])  # [M, 4, 256]
        logits = torch.stack([self.net.head_logits(h, i, _earlier(actions, i)) for i in range(len(SAMPLE_ORDER))], 1)
        logits = (logits + self.prior[layer]).masked_fill(~masks, NEG)
        lp = F.log_softmax(logits, dim=-1)
        logp = lp.gather(2, actions.unsqueeze(-1)).squeeze(-1).sum(1)
        entropy = -(lp.exp() * lp).sum(-1).sum(1)
        return logp, entropy, self.net.critic(h).squeeze(-1)

    def update(self, obs, actions, old_logp, rewards: np.ndarray) -> None:
        n, L = actions.shape[:2]
        self.norm.update(rewards)
        returns = torch.from_numpy(self.norm(rewards).astype(np.float32)).repeat_interleave(L)
        obs, actions, old_logp = obs.reshape(n * L, -1), actions.reshape(n * L, -1), old_logp.reshape(-1)
        layer = torch.arange(L).repeat(n)
        clipped_update(self.net, self.opt, self.cfg, returns, old_logp, lambda: self.evaluate(obs, actions, layer))


def clipped_update(net: nn.Module, opt: torch.optim.Optimizer, cfg: PPOConfig, returns: torch.Tensor,
                   old_logp: torch.Tensor, evaluate) -> None:
    """PPO's clipped-surrogate epochs over one batch of stored steps; `evaluate()` gives the
    current (log-prob, entropy, value) of those steps. Shared by both action spaces."""
    for _ in range(cfg.epochs):
        logp, entropy, value = evaluate()
        adv = returns - value.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = torch.exp(logp - old_logp)
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv)
        loss = -surrogate.mean() + cfg.value_coef * F.mse_loss(value, returns) - cfg.entropy_coef * entropy.mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        opt.step()


def ppo_search(trace: Trace, states: list[LayerState], space: CodeSpace, cfg: PPOConfig, seed: int) -> None:
    agent = PPOAgent(states, space, cfg, seed)
    while trace.remaining > 0:
        n = min(cfg.episodes_per_update, trace.remaining)
        obs, actions, logp = agent.act(n)
        scores = trace.evaluate(agent.candidates(actions))
        if len(scores) >= 2:
            agent.update(obs, actions, logp, np.array([s.reward for s in scores], np.float64))
