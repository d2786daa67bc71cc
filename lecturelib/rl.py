"""A CartPole-v1 policy, trained with PPO, evaluated on seeded episodes, and its quantized variants.

Scope, read top to bottom:

* the environment: Gymnasium's ``CartPole-v1`` with its 500-step time limit honoured (truncation,
  not termination); states are normalized, z = s / STATE_SCALE, before the policy sees them;
* the policy: a 4-128-2 MLP (Linear -> ReLU -> Linear) that outputs two logits; the deployed
  decision is argmax of the logits (softmax is monotone, so it never changes the argmax);
* ``train_ppo``: PPO with a clipped objective and GAE, one readable function in the style of
  CleanRL's ``ppo.py`` (Huang et al., JMLR 2022), with a separate critic that is thrown away;
* ``rollout`` / ``evaluate``: seeded episodes run in lockstep, bit-identical to running
  ``gym.make("CartPole-v1")`` once per seed (tests/test_rl.py checks it);
* quantized variants of the policy: torch.ao dynamic int8 (fbgemm), torch.ao static int8,
  torchao's int8 dynamic-activation config, low-bit weights and activations with lecturelib's
  fake quantization, QAT by distillation, and the integer model all of the low-bit ones convert to;
* what a variant costs: serialized state-dict bytes and batch-1 latency.

Papers: Schulman et al., "Proximal Policy Optimization Algorithms", 2017; Schulman et al.,
"High-Dimensional Continuous Control Using Generalized Advantage Estimation", 2016;
Barto, Sutton & Anderson, "Neuronlike adaptive elements that can solve difficult learning
control problems", 1983 (the cart-pole); Jacob et al., CVPR 2018 (integer inference);
Krishnamoorthi 2018 (PTQ and QAT recipes).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .harness import progress
from .qat_toolchains import quiet  # noqa: F401  (rl.quiet is used by notebook 08)
from .quantizers import PerChannel, QParams, choose_qparams, qparams_from_range, qrange
from .ste import ste_fake_quantize

Tensor = torch.Tensor
ActFn = Callable[[Tensor], Tensor]
"""A policy as the environment sees it: normalized states (N, 4) -> actions (N,) int64."""

ENV_ID = "CartPole-v1"
MAX_STEPS = 500
"""CartPole-v1's time limit: an episode is truncated after 500 steps (CartPole-v0 stopped at 200)."""
REWARD_THRESHOLD = 475.0
"""Gymnasium's ``reward_threshold`` for CartPole-v1: the mean return that counts as solved."""
STATE_SCALE = torch.tensor([2.4, 3.0, 0.2095, 3.5])
"""Normalization z = s / STATE_SCALE for (cart position, cart velocity, pole angle, pole angular
velocity): 2.4 and 0.2095 rad are the termination limits, 3.0 and 3.5 cover the velocities a
balancing policy visits. Box half-widths in notebook 08 are in these normalized units."""
STATE_NAMES = ("cart position", "cart velocity", "pole angle", "pole angular velocity")


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)`` and restore the old count afterwards.

    Batch-1 inference of a 4-128-2 MLP is far too small to share between threads: on a busy
    machine the thread hand-off costs more than the arithmetic, so latency and episodes use 1.
    Used in: 08_cartpole_consistency.
    """
    _check_int(n, "n", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def fbgemm() -> Iterator[None]:
    """Select PyTorch's fbgemm quantized engine for the block (the study's backend)."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def _check_int(value: object, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


def _check_states(x: Tensor, name: str = "states") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of shape (N, 4), got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, found NaN or inf")
    return x.float()


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of non-negative ints, got {seeds[:5]!r}...")
    return [int(s) for s in seeds]


# ----------------------------------------------------------------------------- policy
def normalize(obs: np.ndarray | Tensor) -> Tensor:
    """z = s / STATE_SCALE, as float32 of shape (N, 4). Used in: 08_cartpole_consistency."""
    x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(-1, 4)
    return x / STATE_SCALE


def policy_net(hidden: int = 128) -> nn.Sequential:
    """The 4-hidden-2 policy: logits = W2 relu(W1 z + b1) + b2, action = argmax(logits).

    Used in: 08_cartpole_consistency.
    """
    _check_int(hidden, "hidden", 1)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def greedy(model: Callable[[Tensor], Tensor]) -> ActFn:
    """The deployed decision for a batch of states: argmax of the logits, whole batch at once.

    Right for networks whose every row is computed on its own (float, static scales,
    per-row dynamic scales). Used in: 08_cartpole_consistency.
    """

    @torch.inference_mode()
    def act(z: Tensor) -> Tensor:
        return model(z).argmax(dim=1)

    return act


def one_at_a_time(model: Callable[[Tensor], Tensor]) -> ActFn:
    """The deployed decision at batch 1: run ``model`` on each state alone, argmax each.

    Needed for torch.ao's dynamic quantization, whose activation scale is chosen from the
    whole batch: a state's decision would otherwise depend on the other states.
    Used in: 08_cartpole_consistency.
    """

    @torch.inference_mode()
    def act(z: Tensor) -> Tensor:
        return torch.stack([model(z[i: i + 1])[0].argmax() for i in range(len(z))])

    return act


# ----------------------------------------------------------------------------- episodes
def initial_states(seeds: Sequence[int]) -> np.ndarray:
    """The float64 start state of ``gym.make("CartPole-v1").reset(seed=s)`` for each seed, (N, 4).

    Used in: 08_cartpole_consistency (through ``rollout``).
    """
    import gymnasium as gym

    seeds = _check_seeds(seeds)
    env = gym.make(ENV_ID)
    out = []
    for s in seeds:
        env.reset(seed=s)
        out.append(np.array(env.unwrapped.state, dtype=np.float64))
    env.close()
    return np.stack(out)


@dataclass
class Rollout:
    """Seeded episodes of one policy."""

    returns: np.ndarray
    """float (n_episodes,): undiscounted return of each episode (1 per step survived)."""
    states: Tensor
    """float32 (n_visited, 4): every normalized state the policy acted in, episode after episode."""
    actions: Tensor
    """int64 (n_visited,): the action it took there."""
    episode: Tensor
    """int64 (n_visited,): which episode (index into the seeds) each state belongs to."""


def rollout(act: ActFn, seeds: Sequence[int], max_steps: int = MAX_STEPS) -> Rollout:
    """Run one episode per seed, all in lockstep, and record returns and visited states.

    Each episode starts where ``gym.make("CartPole-v1").reset(seed=s)`` starts and follows
    Gymnasium's own vectorized CartPole dynamics (``CartPoleVectorEnv``), so the observations
    are bit-identical to stepping one ``gym.make`` env per seed. An episode ends on termination
    (pole past 12 degrees or cart past 2.4) or truncation at ``max_steps`` (500 for CartPole-v1).
    return = number of steps survived. Used in: 08_cartpole_consistency.
    """
    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    seeds = _check_seeds(seeds)
    _check_int(max_steps, "max_steps", 1)
    n = len(seeds)
    env = CartPoleVectorEnv(num_envs=n, max_episode_steps=max_steps)
    env.reset(seed=0)
    env.state = initial_states(seeds).T.copy()  # (4, n), as the vector env stores it
    obs = env.state.T.astype(np.float32)
    alive = np.ones(n, dtype=bool)
    returns = np.zeros(n)
    S, A, E = [], [], []
    idx = torch.arange(n)
    while alive.any():
        z = normalize(obs)
        live = torch.from_numpy(alive)
        a = torch.zeros(n, dtype=torch.int64)
        a[live] = act(z[live]).to(torch.int64)
        S.append(z[live]), A.append(a[live]), E.append(idx[live])
        obs, reward, term, trunc, _ = env.step(a.numpy())
        returns += reward * alive
        alive &= ~(term | trunc)
    env.close()
    return Rollout(returns, torch.cat(S), torch.cat(A), torch.cat(E))


def evaluate(act: ActFn, seeds: Sequence[int], max_steps: int = MAX_STEPS) -> np.ndarray:
    """Returns of one seeded episode per seed (see ``rollout``). Used in: 08_cartpole_consistency."""
    return rollout(act, seeds, max_steps).returns


# ----------------------------------------------------------------------------- PPO
@dataclass
class PPOConfig:
    """PPO hyper-parameters (CleanRL's CartPole defaults, sped up for a 2-core laptop)."""

    hidden: int = 128
    """Hidden units of the 4-hidden-2 policy."""
    num_envs: int = 8
    """Parallel environments (Gymnasium's vectorized CartPole)."""
    num_steps: int = 128
    """Steps per environment per rollout; a batch is num_envs * num_steps transitions."""
    total_steps: int = 300_000
    """Upper limit on environment steps."""
    lr: float = 2.5e-3
    """Adam learning rate, annealed linearly to 0 over total_steps."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    num_minibatches: int = 4
    """Minibatches per epoch."""
    update_epochs: int = 4
    """Passes over each batch."""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip."""
    eval_seeds: tuple[int, ...] = tuple(range(10_000, 10_050))
    """Validation episodes for early stopping (disjoint from the notebook's test seeds 0..99)."""
    eval_every: int = 4
    """Evaluate the greedy policy every this many updates."""
    patience: int = 3
    """Stop after this many consecutive perfect validations (every episode reaches 500)."""
    max_seconds: float = 120.0
    """Wall-clock limit on training."""
    seed: int = 0
    """Seeds torch and the environments."""


@dataclass
class TrainResult:
    """What ``train_ppo`` returns."""

    policy: nn.Sequential
    """The trained 4-hidden-2 policy (eval mode)."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """(environment steps, mean greedy validation return) at every evaluation."""
    steps: int = 0
    """Environment steps used."""
    seconds: float = 0.0
    """Wall time of training."""
    solved: bool = False
    """True if training stopped because validation was perfect ``patience`` times in a row."""


def _critic(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def train_ppo(cfg: PPOConfig = PPOConfig()) -> TrainResult:
    """Train the CartPole-v1 policy with PPO (clipped surrogate, GAE, separate critic).

    For each update: collect num_envs * num_steps transitions with the current stochastic policy
    pi(a|z) = softmax(logits)_a; compute advantages with GAE,
        delta_t = r_t + gamma V(z_{t+1}) (1 - terminated_t) - V(z_t),
        A_t = delta_t + gamma lambda (1 - done_t) A_{t+1};
    a truncated episode (500 steps) bootstraps from V of its last state, a terminated one does not.
    Then update_epochs passes of minibatch Adam on
        L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + vf_coef (V - R)^2 - ent_coef H,
        rho = pi_new(a|z) / pi_old(a|z).
    Gymnasium's vector env resets a finished environment on the *next* step (its action is
    ignored, reward 0): those transitions are masked out. Training stops early once the greedy
    policy (argmax) reaches 500 on every validation seed ``patience`` evaluations in a row.
    Paper: Schulman et al. 2017 (PPO), 2016 (GAE); code layout after CleanRL's ppo.py.
    Used in: 08_cartpole_consistency (through ``load_or_train``).
    """
    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    for name in ("hidden", "num_envs", "num_steps", "total_steps", "num_minibatches", "update_epochs", "eval_every",
                 "patience"):
        _check_int(getattr(cfg, name), name, 1)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    policy, critic = policy_net(cfg.hidden), _critic(64)
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
    env = CartPoleVectorEnv(num_envs=cfg.num_envs, max_episode_steps=MAX_STEPS)
    obs, _ = env.reset(seed=cfg.seed)
    prev_done = np.zeros(cfg.num_envs, dtype=bool)
    T, N = cfg.num_steps, cfg.num_envs
    batch = T * N
    n_updates = cfg.total_steps // batch
    result = TrainResult(policy)
    streak = 0
    for update in progress(range(1, n_updates + 1), desc="PPO updates"):
        for g in opt.param_groups:  # linear learning-rate annealing
            g["lr"] = cfg.lr * (1.0 - (update - 1) / n_updates)
        # ---- ROLLOUT: act with the current stochastic policy
        Z = torch.zeros(T + 1, N, 4)
        A = torch.zeros(T, N, dtype=torch.int64)
        LOGP, R, TERM, DONE, VALID = (torch.zeros(T, N) for _ in range(5))
        for t in range(T):
            z = normalize(obs)
            Z[t] = z
            with torch.no_grad():
                dist = torch.distributions.Categorical(logits=policy(z))
                a = dist.sample()
            A[t], LOGP[t] = a, dist.log_prob(a)
            VALID[t] = torch.from_numpy(~prev_done).float()  # False: this step only resets the env
            obs, r, term, trunc, _ = env.step(a.numpy())
            R[t], TERM[t] = torch.from_numpy(r), torch.from_numpy(term).float()
            DONE[t] = torch.from_numpy(term | trunc).float()
            prev_done = term | trunc
        Z[T] = normalize(obs)
        result.steps += batch
        # ---- ADVANTAGES (GAE): V(z_{t+1}) is the true next state, also after truncation
        with torch.no_grad():
            V = critic(Z.reshape(-1, 4)).reshape(T + 1, N)
        ADV = torch.zeros(T, N)
        last = torch.zeros(N)
        for t in reversed(range(T)):
            delta = R[t] + cfg.gamma * V[t + 1] * (1.0 - TERM[t]) - V[t]
            last = (delta + cfg.gamma * cfg.gae_lambda * (1.0 - DONE[t]) * last) * VALID[t]
            ADV[t] = last
        RET = ADV + V[:T]
        keep = VALID.reshape(-1).bool()
        bz, ba, blogp = Z[:T].reshape(-1, 4)[keep], A.reshape(-1)[keep], LOGP.reshape(-1)[keep]
        badv, bret = ADV.reshape(-1)[keep], RET.reshape(-1)[keep]
        # ---- PPO UPDATE: clipped surrogate + value loss
        for _ in range(cfg.update_epochs):
            for j in torch.randperm(len(bz)).tensor_split(cfg.num_minibatches):
                dist = torch.distributions.Categorical(logits=policy(bz[j]))
                ratio = (dist.log_prob(ba[j]) - blogp[j]).exp()
                adv = (badv[j] - badv[j].mean()) / (badv[j].std() + 1e-8)
                pg = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef) * adv).mean()
                v_loss = ((critic(bz[j]).squeeze(1) - bret[j]) ** 2).mean()
                loss = pg + cfg.vf_coef * v_loss - cfg.ent_coef * dist.entropy().mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
        # ---- EARLY STOP: the greedy policy on held-out seeds
        if update % cfg.eval_every == 0:
            policy.eval()
            ret = evaluate(greedy(policy), cfg.eval_seeds)
            policy.train()
            result.history.append((result.steps, float(ret.mean())))
            streak = streak + 1 if bool((ret >= MAX_STEPS).all()) else 0
            if streak >= cfg.patience:
                result.solved = True
                break
        if time.perf_counter() - t0 > cfg.max_seconds:
            break
    env.close()
    policy.eval()
    result.seconds = time.perf_counter() - t0
    return result


def load_or_train(path: str | Path, cfg: PPOConfig = PPOConfig()) -> tuple[nn.Sequential, TrainResult | None]:
    """Load the policy's state_dict from ``path`` if it exists, else ``train_ppo(cfg)`` and save it there.

    Returns (policy, None) when loaded, (policy, TrainResult) when trained. Training runs on one
    thread, so the same config gives the same weights (torch.save's bytes still differ per save).
    Used in: 08_cartpole_consistency.
    """
    path = Path(path)
    if path.exists():
        policy = policy_net(cfg.hidden)
        policy.load_state_dict(torch.load(path, weights_only=True))
        return policy.eval(), None
    with threads(1):  # one thread: faster for these sizes, and the same weights on every machine
        result = train_ppo(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result.policy.state_dict(), path)
    return result.policy, result


# ----------------------------------------------------------------------------- what a variant costs
def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the deployed checkpoint weighs on disk.

    The same measure as ``qat_toolchains.serialized_size`` (one implementation).
    Used in: 08_cartpole_consistency.
    """
    from .qat_toolchains import serialized_size

    return serialized_size(model)


@torch.inference_mode()
def latency_ms(model: Callable[[Tensor], Tensor], x: Tensor, repeats: int = 1000, warmup: int = 100,
               n_threads: int = 1) -> float:
    """Median wall time of one call ``model(x)`` in milliseconds, after ``warmup`` calls.

    time.perf_counter around each call; the median over ``repeats`` calls resists a shared
    CPU's outliers. Threads are pinned to ``n_threads`` and the quantized engine is fbgemm.
    Used in: 08_cartpole_consistency.
    """
    _check_int(repeats, "repeats", 1)
    _check_int(warmup, "warmup", 0)
    _check_states(x, "x")
    times = []
    with threads(n_threads), fbgemm(), quiet():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def agreement(act_f: ActFn, act_g: ActFn, states: Tensor) -> float:
    """Fraction of states where the two policies choose the same action: mean(a_f == a_g).

    Used in: 08_cartpole_consistency.
    """
    states = _check_states(states)
    with fbgemm(), quiet():
        return float((act_f(states) == act_g(states)).float().mean())


# ----------------------------------------------------------------------------- torch.ao and torchao int8
def dynamic_int8(policy: nn.Module) -> nn.Module:
    """torch.ao dynamic PTQ, as in the study: ``quantize_dynamic(policy, {nn.Linear}, torch.qint8)``, fbgemm.

    Weights: int8, per tensor, symmetric. Activations: quantized at run time to uint8 with
    reduce_range (codes 0..127), S = (max(x, 0) - min(x, 0)) / 127 over the *whole batch*,
    so a state's decision can depend on the other states in its batch.
    torch.ao.quantization is deprecated in favour of torchao; its warnings are silenced.
    Paper: Krishnamoorthi 2018. Used in: 08_cartpole_consistency.
    """
    with quiet(), fbgemm():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(policy).eval(), {nn.Linear}, dtype=torch.qint8)


class _Stubbed(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.net = net
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.net(self.quant(x)))


def static_int8(policy: nn.Module, calib_states: Tensor) -> nn.Module:
    """torch.ao eager static PTQ for fbgemm: QuantStub -> fused Linear+ReLU -> Linear -> DeQuantStub.

    qconfig = get_default_qconfig("fbgemm"): weights int8 per output channel, symmetric;
    activations uint8 per tensor with a HistogramObserver range (reduce_range: the range is
    mapped onto codes 0..127), calibrated on ``calib_states``; then ``convert``.
    Paper: Krishnamoorthi 2018; Jacob et al. 2018. Used in: 08_cartpole_consistency.
    """
    calib_states = _check_states(calib_states, "calib_states")
    with quiet(), fbgemm():
        tq = torch.ao.quantization
        net = _Stubbed(copy.deepcopy(policy)).eval()
        tq.fuse_modules(net.net, [["0", "1"]], inplace=True)
        net.qconfig = tq.get_default_qconfig("fbgemm")
        tq.prepare(net, inplace=True)
        with torch.no_grad():
            net(calib_states)
        return tq.convert(net, inplace=True).eval()


def untrained_qat(policy: nn.Module, calib_states: Tensor) -> tuple[nn.Module, int]:
    """The study's "QAT": ``prepare_qat`` then ``convert`` with no optimizer step in between.

    Forward passes over ``calib_states`` (train mode, as a training loop without a step would
    do) let the observers see data; no weight moves. Returns (converted model, number of
    integer weight codes that differ from ``static_int8``'s): 0 means this "QAT" is PTQ.
    Used in: 08_cartpole_consistency.
    """
    calib_states = _check_states(calib_states, "calib_states")
    with quiet(), fbgemm():
        tq = torch.ao.quantization
        net = _Stubbed(copy.deepcopy(policy)).train()
        tq.fuse_modules_qat(net.net, [["0", "1"]], inplace=True)
        net.qconfig = tq.get_default_qat_qconfig("fbgemm")
        tq.prepare_qat(net, inplace=True)
        with torch.no_grad():
            net(calib_states)
        converted = tq.convert(net.eval(), inplace=False)
        ptq = static_int8(policy, calib_states)
        differ = 0
        for a, b in zip([converted.net[0], converted.net[2]], [ptq.net[0], ptq.net[2]]):
            differ += int((a.weight().int_repr() != b.weight().int_repr()).sum())
    return converted, differ


def torchao_int8(policy: nn.Module) -> nn.Module:
    """torchao 0.18: ``quantize_(policy, Int8DynamicActivationInt8WeightConfig())``.

    Weights int8 per output row, symmetric; activations int8 symmetric with one scale per
    row (per token), chosen at run time: S = max|x_row| / 127.5. Per-row scales make each
    state's decision independent of its batch. Used in: 08_cartpole_consistency.
    """
    with quiet():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        net = copy.deepcopy(policy).eval()
        quantize_(net, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return net


def batch_flips(model: nn.Module, states: Tensor, batch_sizes: Sequence[int], seed: int = 0) -> dict[int, float]:
    """For each batch size B: the fraction of states whose action changes when they are decided in
    random batches of B instead of one at a time, mean(argmax model(batch)[i] != argmax model(s_i)).

    0 for a network whose rows are independent; > 0 for torch.ao dynamic quantization, whose
    activation scale comes from the whole batch. Used in: 08_cartpole_consistency.
    """
    states = _check_states(states)
    sizes = [_check_int(b, "batch_sizes", 1) for b in batch_sizes]
    out = {}
    with threads(1), fbgemm(), quiet():
        alone = one_at_a_time(model)(states)
        for bs in sizes:
            perm = torch.randperm(len(states), generator=torch.Generator().manual_seed(seed))
            together = torch.empty_like(alone)
            with torch.inference_mode():
                for chunk in perm.split(bs):
                    together[chunk] = model(states[chunk]).argmax(1)
            out[bs] = float((alone != together).float().mean())
    return out


# ----------------------------------------------------------------------------- low-bit weights and activations
def _codes_qparams(x: Tensor, scale: Tensor, zero_point: Tensor, num_bits: int) -> QParams:
    """Per-tensor QParams with a fixed (scale, zero_point) for a tensor of x's shape."""
    qmin, qmax = qrange(num_bits)
    one = [1] * x.ndim
    return QParams(scale.reshape(one), zero_point.reshape(one).to(torch.int32), qmin, qmax, tuple(x.shape),
                   tuple(x.shape))


def pack_codes(q: Tensor, num_bits: int) -> Tensor:
    """Pack signed num_bits codes into bytes: u = q - qmin (0..2^b - 1), b bits each, little-endian.

    n codes take ceil(n b / 8) bytes, so a 4-bit weight really weighs half a byte.
    Used in: 08_cartpole_consistency (LowBitPolicy's state_dict).
    """
    qmin, qmax = qrange(num_bits)
    q = q.reshape(-1).to(torch.int64)
    if len(q) and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"codes must lie in {qmin}..{qmax} for num_bits={num_bits}")
    bits = ((q - qmin)[:, None] >> torch.arange(num_bits)) & 1
    bits = torch.cat([bits.reshape(-1), torch.zeros((-bits.numel()) % 8, dtype=torch.int64)])
    return (bits.reshape(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, num_bits: int, n: int) -> Tensor:
    """Inverse of ``pack_codes``: the first n signed codes, int32. Used in: 08_cartpole_consistency."""
    qmin, _ = qrange(num_bits)
    bits = (packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1
    bits = bits.reshape(-1)[: n * num_bits].reshape(n, num_bits)
    return ((bits << torch.arange(num_bits)).sum(1) + qmin).to(torch.int32)


@dataclass(frozen=True)
class ActRanges:
    """Calibrated real ranges of the two quantized activations of a 4-H-2 policy."""

    state: tuple[float, float]
    """(min, max) of the normalized state, all four components together (one scale per tensor)."""
    hidden: tuple[float, float]
    """(min, max) of the hidden ReLU output."""


def calibrate(policy: nn.Module, states: Tensor) -> ActRanges:
    """Min/max calibration of the input and hidden activations on ``states`` (float policy).

    Used in: 08_cartpole_consistency.
    """
    states = _check_states(states)
    with torch.no_grad():
        h = torch.relu(policy[0](states))
    return ActRanges((float(states.min()), float(states.max())), (0.0, float(h.max())))


class FakeQuantPolicy(nn.Module):
    """The policy with lecturelib fake quantization (straight-through estimator) on weights and activations.

    forward: x_fq = FQ(x; S_in, Z_in), h = relu(FQ(W1) x_fq + FQ(b1)), h_fq = FQ(h; S_h, Z_h),
    logits = FQ(W2) h_fq + FQ(b2), biases rounded as the integer model stores them. Weights: per output channel, symmetric, S from the current W
    (so they move during QAT), at ``weight_bits`` (default num_bits); weight_bits = 1 is binary,
    W_b = alpha sign(W) with alpha = mean |W| per output channel (BWN, XNOR-Net). Activations: per
    tensor, asymmetric, S and Z fixed from ``calibrate``, at num_bits.
    Paper: Jacob et al. 2018; Bengio et al. 2013 (STE); Rastegari et al. 2016 (BWN).
    Used in: 08_cartpole_consistency.
    """

    def __init__(self, policy: nn.Module, num_bits: int, ranges: ActRanges, weight_bits: int | None = None):
        super().__init__()
        from .quantizers import check_bits

        self.num_bits = check_bits(num_bits)
        self.weight_bits = num_bits if weight_bits is None else (1 if weight_bits == 1 else check_bits(weight_bits,
                                                                                                      name="weight_bits"))
        self.fc1, self.fc2 = copy.deepcopy(policy[0]), copy.deepcopy(policy[2])
        self.ranges = ranges
        s_in, z_in = qparams_from_range(torch.tensor(ranges.state[0]), torch.tensor(ranges.state[1]), num_bits)
        s_h, z_h = qparams_from_range(torch.tensor(ranges.hidden[0]), torch.tensor(ranges.hidden[1]), num_bits)
        self.register_buffer("in_scale", s_in)
        self.register_buffer("in_zero_point", z_in)
        self.register_buffer("hid_scale", s_h)
        self.register_buffer("hid_zero_point", z_h)

    def weight_codes(self, W: Tensor) -> tuple[Tensor, Tensor]:
        """(integer codes, per-output-channel scale) of a weight matrix: W_q = scale * codes."""
        W = W.detach()
        if self.weight_bits == 1:
            return torch.where(W >= 0, 1, -1).to(torch.int32), W.abs().mean(1)
        from .quantizers import quantize

        qp = choose_qparams(W, self.weight_bits, symmetric=True, granularity=PerChannel(0))
        return quantize(W, qp), qp.scale.reshape(-1)

    def fake_weight(self, W: Tensor) -> Tensor:
        """W_q with the STE: forward W_q, backward the identity."""
        codes, scale = self.weight_codes(W)
        return W + (codes.to(W.dtype) * scale[:, None] - W).detach()

    def fake_bias(self, b: Tensor, W: Tensor, s_act: Tensor) -> Tensor:
        """The int32 bias of integer inference, q_b = round(b / (S_act S_W)), dequantized, with the STE.

        At 8 bits S_act S_W is tiny and this rounding invisible; at 2 bits it moves logits by
        up to S_act S_W / 2, so training must see it too."""
        step = s_act * self.weight_codes(W)[1]
        return b + (torch.round(b.detach() / step) * step - b).detach()

    def forward(self, x: Tensor) -> Tensor:
        x = ste_fake_quantize(x, _codes_qparams(x, self.in_scale, self.in_zero_point, self.num_bits))
        W1, W2 = self.fc1.weight, self.fc2.weight
        h = torch.relu(x @ self.fake_weight(W1).T + self.fake_bias(self.fc1.bias, W1, self.in_scale))
        h = ste_fake_quantize(h, _codes_qparams(h, self.hid_scale, self.hid_zero_point, self.num_bits))
        return h @ self.fake_weight(W2).T + self.fake_bias(self.fc2.bias, W2, self.hid_scale)


class LowBitPolicy(nn.Module):
    """Integer-only deployment of a 4-H-2 policy (what ``FakeQuantPolicy`` converts to).

    q_x = clamp(round(x / S_in) + Z_in, qmin, qmax)
    acc1 = (q_x - Z_in) @ q_W1^T + q_b1          (int32; q_b1 = round(b1 / (S_in S_W1)))
    h = relu(acc1 * S_in S_W1);  q_h = clamp(round(h / S_h) + Z_h, qmin, qmax)
    logits = ((q_h - Z_h) @ q_W2^T + q_b2) * S_h S_W2
    Weights are stored bit-packed (``pack_codes``), so the state_dict of a 4-bit policy holds half
    a byte per weight; scales are float32, biases int32. Rows are independent (static scales).
    Paper: Jacob et al. 2018 (integer-arithmetic-only inference). Used in: 08_cartpole_consistency.
    """

    def __init__(self, fq: FakeQuantPolicy):
        super().__init__()
        self.num_bits, self.weight_bits = fq.num_bits, fq.weight_bits
        self.hidden = fq.fc1.out_features
        for i, fc in ((1, fq.fc1), (2, fq.fc2)):
            q, w_scale = fq.weight_codes(fc.weight)
            s_act = fq.in_scale if i == 1 else fq.hid_scale
            packed = pack_codes((q - 1) // 2, 1) if self.weight_bits == 1 else pack_codes(q, self.weight_bits)
            self.register_buffer(f"w{i}_packed", packed)
            self.register_buffer(f"w{i}_scale", w_scale.clone())
            b_q = torch.round(fc.bias.detach() / (s_act * w_scale)).to(torch.int32)
            self.register_buffer(f"b{i}_q", b_q)
        for name in ("in_scale", "in_zero_point", "hid_scale", "hid_zero_point"):
            self.register_buffer(name, getattr(fq, name).clone())
        self._unpack()
        self.register_load_state_dict_post_hook(lambda module, keys: module._unpack())

    def _unpack(self) -> None:
        def codes(packed: Tensor, n: int) -> Tensor:
            if self.weight_bits == 1:
                return unpack_codes(packed, 1, n) * 2 + 1
            return unpack_codes(packed, self.weight_bits, n)

        self.w1 = codes(self.w1_packed, self.hidden * 4).reshape(self.hidden, 4)
        self.w2 = codes(self.w2_packed, 2 * self.hidden).reshape(2, self.hidden)

    def _codes(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        from .quantizers import quantize

        return quantize(x, _codes_qparams(x, scale, zero_point, self.num_bits)) - zero_point.to(torch.int32)

    def forward(self, x: Tensor) -> Tensor:
        acc1 = self._codes(x.float(), self.in_scale, self.in_zero_point) @ self.w1.T + self.b1_q
        h = torch.relu(acc1.float() * (self.in_scale * self.w1_scale))
        acc2 = self._codes(h, self.hid_scale, self.hid_zero_point) @ self.w2.T + self.b2_q
        return acc2.float() * (self.hid_scale * self.w2_scale)

    def effective(self) -> dict:
        """The real-valued layers this integer network computes, for interval analysis:
        W_eff = S_W q_W, b_eff = S_act S_W q_b, and the two static activation quantizers."""
        from .intervals import ActQuant

        qmin, qmax = qrange(self.num_bits)
        d = lambda t: t.double()  # noqa: E731
        return {
            "W1": d(self.w1) * d(self.w1_scale)[:, None], "b1": d(self.b1_q) * d(self.in_scale) * d(self.w1_scale),
            "W2": d(self.w2) * d(self.w2_scale)[:, None], "b2": d(self.b2_q) * d(self.hid_scale) * d(self.w2_scale),
            "q_in": ActQuant("static", qmin, qmax, float(self.in_scale), int(self.in_zero_point)),
            "q_hid": ActQuant("static", qmin, qmax, float(self.hid_scale), int(self.hid_zero_point)),
        }


def lowbit_ptq(policy: nn.Module, num_bits: int, calib_states: Tensor, weight_bits: int | None = None) -> LowBitPolicy:
    """PTQ at num_bits with lecturelib's quantizers: calibrate, fake-quantize, convert to integers.

    Weights at ``weight_bits`` (default num_bits; 1 = binary, BWN). Used in: 08_cartpole_consistency.
    """
    return LowBitPolicy(FakeQuantPolicy(policy, num_bits, calibrate(policy, calib_states), weight_bits))


@dataclass
class QATConfig:
    """Distillation QAT settings."""

    steps: int = 400
    """Adam steps per round."""
    batch_size: int = 512
    """States per step."""
    lr: float = 2e-3
    """Adam learning rate."""
    noise: float = 0.01
    """Std of Gaussian noise added to the training states (normalized units): boxes, not points."""
    margin_weight: float = 0.0
    """Weight of the consistency term mean(relu(gamma - sign(m_f) m_g)); 0 = plain distillation."""
    gamma: float = 0.1
    """Target margin (logits) of the consistency term."""
    dagger_rounds: int = 3
    """Extra rounds that add the states the quantized student visits (DAgger) before training on."""
    dagger_seeds: tuple[int, ...] = tuple(range(2000, 2010))
    """Episodes the student plays in each DAgger round (disjoint from the test seeds 0..99)."""
    seed: int = 0
    """Seeds the batches and the noise."""


def qat_distill(policy: nn.Module, num_bits: int, states: Tensor, cfg: QATConfig = QATConfig(),
                weight_bits: int | None = None) -> tuple[
        FakeQuantPolicy, LowBitPolicy, list[float]]:
    """QAT that trains: fine-tune FakeQuantPolicy(policy) by distillation from the float policy.

    loss = KL(softmax(f(z)) || softmax(g(z))) + margin_weight * mean(relu(gamma - sign(m_f(z)) m_g(z)))
    over z = s + noise, s drawn from ``states`` (float-visited states), m = logit_1 - logit_0;
    gradients pass the fake quantizers with the STE. After each of ``dagger_rounds`` rounds the
    converted student plays ``dagger_seeds`` and the states it visits join the data (DAgger,
    Ross et al. 2011: the teacher labels where the student goes, not only where it went).
    Then convert to ``LowBitPolicy``.
    Returns (trained fake-quant model, converted integer model, loss history).
    Paper: Hinton et al. 2015 (distillation); Ross, Gordon & Bagnell 2011 (DAgger); Jacob et al. 2018
    (QAT); Bengio et al. 2013 (STE).
    Used in: 08_cartpole_consistency.
    """
    states = _check_states(states)
    _check_int(cfg.steps, "steps", 0)
    _check_int(cfg.batch_size, "batch_size", 1)
    _check_int(cfg.dagger_rounds, "dagger_rounds", 0)
    with threads(1):  # small tensors: one thread is faster, and the result does not depend on the machine
        return _qat_distill(policy, num_bits, states, cfg, weight_bits)


def _qat_distill(policy: nn.Module, num_bits: int, states: Tensor, cfg: QATConfig,
                 weight_bits: int | None) -> tuple[FakeQuantPolicy, LowBitPolicy, list[float]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    fq = FakeQuantPolicy(policy, num_bits, calibrate(policy, states), weight_bits)
    opt = torch.optim.Adam(fq.parameters(), lr=cfg.lr)
    history = []
    data = states
    total = (cfg.dagger_rounds + 1) * cfg.steps
    for i in progress(range(total), desc=f"QAT steps ({num_bits}-bit, {cfg.dagger_rounds} DAgger rounds)"):
        round_, step = divmod(i, cfg.steps)
        if step == 0 and round_ > 0:  # DAgger: where does the student go? the float teacher labels those too
            visited = rollout(greedy(LowBitPolicy(fq.eval())), cfg.dagger_seeds).states
            data = torch.cat([data, visited])
        if step == 0:
            fq.train()
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        z = data[idx] + cfg.noise * torch.randn(cfg.batch_size, 4, generator=gen)
        with torch.no_grad():
            t = policy(z)
        y = fq(z)
        loss = nn.functional.kl_div(y.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
        if cfg.margin_weight > 0:
            sign = torch.sign(t[:, 1] - t[:, 0])
            loss = loss + cfg.margin_weight * torch.relu(cfg.gamma - sign * (y[:, 1] - y[:, 0])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    fq.eval()
    return fq, LowBitPolicy(fq), history
