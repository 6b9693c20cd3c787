"""The pruning agent: the LUT search's PPO actor-critic (deploy_kit/search/ppo.py) on a second
action space — one keep-ratio choice per prunable layer.

An episode walks the prunable layers in forward order (AMC). At each layer the agent sees AMC's
state — index, type, c_in, c_out, stride, kernel, parameters, MACs removed so far, MACs left,
previous action — and picks one of `BINS` keep ratios: bin 0 is the layer's floor (one channel
step), bin b > 0 keeps b/(BINS−1) of the channels, rounded to steps of 8 (4 under 32 channels).
The budget is hard (AMC's "action wall"): a bin is masked out when even the smallest choices for
every later layer could no longer bring the model within budget, so every episode meets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from deploy_kit.prune.latency import channel_step, round_channels
from deploy_kit.prune.surgery import LayerInfo, full_channels, macs, resolve_channels
from deploy_kit.search.ppo import NEG, ActorCritic, PPOConfig, RunningNorm, clipped_update

BINS = 17  # floor, then keep ratios 1/16 … 16/16
STATE_FEATURES = ("index", "is_conv", "is_linear", "c_in", "c_out", "stride", "kernel", "params",
                  "macs_removed", "macs_left", "prev_action")


def bin_channels(info: LayerInfo, b: int) -> int:
    if b == 0:
        return min(info.c_out, channel_step(info.c_out))
    return round_channels(info.c_out, b / (BINS - 1))


@dataclass
class ChannelSpace:
    """The prunable layers, the cost to budget (latency or MACs) and the budget itself."""

    infos: dict  # name → LayerInfo (every block)
    cost: Callable[[dict[str, int]], float]  # channels of the prunable layers → cost
    budget: float  # an absolute cost: ratio × the full model's cost

    def __post_init__(self):
        self.layers = [i for i in self.infos.values() if i.prunable]
        self.full = full_channels(self.infos)
        self.floor = {i.name: bin_channels(i, 0) for i in self.layers}
        self.total_macs = macs(self.infos, self.full)
        self.max_c = max(max(i.c_in, i.c_out) for i in self.infos.values())
        self.max_params = max(i.params for i in self.infos.values())

    def reachable(self) -> float:
        return self.cost(self.floor)

    def legal(self, chosen: dict[str, int], l: int) -> np.ndarray:
        """[BINS] bool: bins of layer l that keep the budget reachable with floors after it."""
        info = self.layers[l]
        ok = np.zeros(BINS, bool)
        for b in range(BINS):
            trial = {**self.floor, **chosen, info.name: bin_channels(info, b)}
            ok[b] = self.cost(trial) <= self.budget * (1 + 1e-9)
        ok[0] = True  # floors everywhere are within budget (checked before the search starts)
        return ok

    def state(self, chosen: dict[str, int], l: int, prev: float) -> np.ndarray:
        info = self.layers[l]
        c_in = {i.name: ci for i, ci, _ in resolve_channels(self.infos, {**self.full, **chosen})}[info.name]
        removed = self.total_macs - macs(self.infos, {**self.full, **chosen})
        later = sum(i.macs(i.c_in, i.c_out) for i in self.layers[l + 1:])
        return np.array([l / max(len(self.layers) - 1, 1), info.kind == "conv", info.kind == "linear",
                         c_in / self.max_c, info.c_out / self.max_c, info.stride / 2, info.kernel / 5,
                         info.params / self.max_params, removed / self.total_macs, later / self.total_macs, prev],
                        np.float32)


def uniform_prior(space: ChannelSpace, width: float) -> torch.Tensor:
    """[L, BINS] logit bias: a Gaussian bump around the L1-uniform keep ratio that fits the budget
    (the LUT search's histogram prior, for this action space); zeros if width = 0. Without it the
    first episodes draw early layers uniformly and leave later ones only their floors: on
    VGG16-0.5 (digits, latency=0.5) 96 episodes then never beat the uniform ratio (benchmarks/prune.md)."""
    if width == 0:
        return torch.zeros(len(space.layers), BINS)
    ratio = uniform_ratio(space)
    sigma = max(1.5, width * BINS)
    bins = torch.arange(BINS, dtype=torch.float32)
    return (-0.5 * ((bins - ratio * (BINS - 1)) / sigma) ** 2).expand(len(space.layers), BINS).clone()


class PruneAgent:
    """PPO over keep-ratio bins with the LUT search's ActorCritic (one head) and update."""

    def __init__(self, space: ChannelSpace, cfg: PPOConfig, seed: int):
        torch.manual_seed(seed)
        self.space, self.cfg = space, cfg
        self.prior = uniform_prior(space, cfg.prior_width)
        self.net = ActorCritic(len(STATE_FEATURES), cfg.hidden, n_heads=1, n_actions=BINS)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.norm = RunningNorm()

    def _logits(self, h: torch.Tensor, masks: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        logits = self.net.head_logits(h, 0, h.new_zeros(h.shape[0], 0)) + self.prior[layer]
        return logits.masked_fill(~masks, NEG)

    @torch.no_grad()
    def act(self, n: int):
        """n episodes: observations [n, L, F], actions [n, L], masks [n, L, BINS], log-probs [n, L],
        and the channel counts each episode chose."""
        chosen = [dict() for _ in range(n)]
        prev = np.ones(n, np.float32)
        obs, acts, masks, logps = [], [], [], []
        for l, info in enumerate(self.space.layers):
            o = torch.from_numpy(np.stack([self.space.state(chosen[e], l, prev[e]) for e in range(n)]))
            m = torch.from_numpy(np.stack([self.space.legal(chosen[e], l) for e in range(n)]))
            lp = F.log_softmax(self._logits(self.net.encoder(o), m, torch.full((n,), l)), dim=-1)
            a = torch.multinomial(lp.exp(), 1, generator=self.gen).squeeze(1)
            for e, b in enumerate(a.tolist()):
                chosen[e][info.name] = bin_channels(info, b)
                prev[e] = chosen[e][info.name] / info.c_out
            obs.append(o), acts.append(a), masks.append(m), logps.append(lp.gather(1, a[:, None]).squeeze(1))
        return torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(masks, 1), torch.stack(logps, 1), chosen

    def evaluate(self, obs, actions, masks, layer):
        h = self.net.encoder(obs)
        lp = F.log_softmax(self._logits(h, masks, layer), dim=-1)
        logp = lp.gather(1, actions[:, None]).squeeze(1)
        entropy = -(lp.exp() * lp).sum(-1)
        return logp, entropy, self.net.critic(h).squeeze(-1)

    def update(self, obs, actions, masks, old_logp, rewards: np.ndarray) -> None:
        n, L = actions.shape
        self.norm.update(rewards)
        returns = torch.from_numpy(self.norm(rewards).astype(np.float32)).repeat_interleave(L)
        obs, actions = obs.reshape(n * L, -1), actions.reshape(-1)
        masks, old_logp, layer = masks.reshape(n * L, -1), old_logp.reshape(-1), torch.arange(L).repeat(n)
        clipped_update(self.net, self.opt, self.cfg, returns, old_logp, lambda: self.evaluate(obs, actions, masks, layer))


def ppo_prune_search(space: ChannelSpace, score: Callable[[list[dict[str, int]]], list[float]], episodes: int,
                     cfg: PPOConfig, seed: int) -> None:
    """Propose `episodes` configurations; `score` evaluates (and records) each batch. The first is
    the L1-uniform configuration, so the search starts from the baseline and can only improve on it."""
    agent = PruneAgent(space, cfg, seed)
    score([uniform_config(space)])
    done = 1
    while done < episodes:
        n = min(cfg.episodes_per_update, episodes - done)
        obs, actions, masks, logp, chosen = agent.act(n)
        rewards = score(chosen)
        done += n
        if n >= 2:
            agent.update(obs, actions, masks, logp, np.asarray(rewards, np.float64))


def uniform_ratio(space: ChannelSpace) -> float:
    """The largest single keep ratio (in 1/64 steps) whose configuration is within budget."""
    best = 0.0
    for k in range(1, 65):
        if space.cost({i.name: round_channels(i.c_out, k / 64) for i in space.layers}) <= space.budget * (1 + 1e-9):
            best = k / 64
    return best


def uniform_config(space: ChannelSpace) -> dict[str, int]:
    """The L1-uniform baseline: one keep ratio for every layer, the largest within budget."""
    ratio = uniform_ratio(space)
    if ratio == 0:
        return dict(space.floor)
    return {i.name: round_channels(i.c_out, ratio) for i in space.layers}
