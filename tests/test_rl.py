"""Tests for lecturelib.rl: episodes against Gymnasium itself, PPO smoke test, quantized variants."""

from pathlib import Path

import gymnasium as gym
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib import rl

HSET = settings(max_examples=30, deadline=None, derandomize=True)
ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "data" / "cartpole_policy.pt"


def simple_policy(z: torch.Tensor) -> torch.Tensor:
    """A hand-written controller: push towards where the pole is falling."""
    return (z[:, 2] + 0.6 * z[:, 3] + 0.02 * z[:, 1] > 0).long()


@pytest.fixture(scope="module")
def policy():
    net, _ = rl.load_or_train(POLICY)
    return net


@pytest.fixture(scope="module")
def calib(policy):
    return rl.rollout(rl.greedy(policy), range(1000, 1004)).states


# ----------------------------------------------------------------------------- episodes
def test_rollout_matches_one_gym_env_per_seed():
    seeds = [0, 3, 7, 11]
    ro = rl.rollout(simple_policy, seeds)
    for i, s in enumerate(seeds):
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=s)
        states, ret = [], 0.0
        while True:
            z = rl.normalize(obs)
            states.append(z[0])
            obs, r, term, trunc, _ = env.step(int(simple_policy(z)[0]))
            ret += r
            if term or trunc:
                break
        assert ret == ro.returns[i]
        assert torch.equal(torch.stack(states), ro.states[ro.episode == i])  # bit-identical observations


def test_truncation_at_500_and_a_cap():
    ro = rl.rollout(simple_policy, range(5))
    assert (ro.returns == 500).all() and len(ro.states) == 5 * 500
    assert (rl.evaluate(simple_policy, range(5), max_steps=200) == 200).all()
    assert gym.spec("CartPole-v1").max_episode_steps == rl.MAX_STEPS


def test_a_bad_policy_terminates_early():
    assert (rl.evaluate(lambda z: torch.zeros(len(z), dtype=torch.long), range(3)) < 50).all()


def test_checkpoint_solves_all_100_test_episodes(policy):
    assert (rl.evaluate(rl.greedy(policy), range(100)) == 500).all()


def test_ppo_smoke_and_load_or_train(tmp_path):
    cfg = rl.PPOConfig(num_envs=4, num_steps=32, total_steps=512, eval_every=2, eval_seeds=(10_000,))
    res = rl.train_ppo(cfg)
    assert res.steps == 512 and len(res.history) == 2 and not res.solved
    path = tmp_path / "p.pt"
    net, trained = rl.load_or_train(path, cfg)
    assert trained is not None and path.exists()
    net2, again = rl.load_or_train(path, cfg)
    assert again is None and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert torch.load(path, weights_only=True).keys() == net.state_dict().keys()


# ----------------------------------------------------------------------------- variants
@HSET
@given(st.integers(1, 8), st.integers(1, 300), st.integers(0, 10_000))
def test_pack_unpack_roundtrip(bits, n, seed):
    lo, hi = rl.qrange(bits)
    q = torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed))
    packed = rl.pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and len(packed) == -(-n * bits // 8)
    assert torch.equal(rl.unpack_codes(packed, bits, n), q.to(torch.int32))


@pytest.mark.parametrize("bits, wbits", [(8, None), (4, None), (3, None), (2, None), (2, 1)])
def test_integer_model_equals_fake_quant(policy, calib, bits, wbits):
    fq = rl.FakeQuantPolicy(policy, bits, rl.calibrate(policy, calib), wbits)
    m = rl.LowBitPolicy(fq)
    with torch.no_grad():
        a, b = fq(calib), m(calib)
    assert torch.allclose(a, b, atol=1e-5)
    m2 = rl.LowBitPolicy(fq)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(calib), b)
    assert m.w1_packed.numel() == 128 * 4 * (wbits or bits) // 8


def test_dynamic_int8_depends_on_batch_and_torchao_does_not(policy):
    states = rl.rollout(rl.greedy(policy), range(3)).states
    wide = torch.tensor([[0.5, -0.5, 0.1, 0.4]])
    dyn, ao = rl.dynamic_int8(policy), rl.torchao_int8(policy)
    with torch.inference_mode(), rl.fbgemm():
        alone = torch.stack([dyn(s[None])[0] for s in states]).argmax(1)
        paired = torch.stack([dyn(torch.cat([s[None], wide]))[0] for s in states]).argmax(1)
    assert (alone != paired).any()
    assert rl.batch_flips(ao, states[::5], (64,))[64] == 0.0


def test_untrained_qat_is_ptq(policy, calib):
    _, differ = rl.untrained_qat(policy, calib)
    assert differ == 0


def test_qat_changes_weights_and_converts(policy, calib):
    cfg = rl.QATConfig(steps=20, dagger_rounds=1, dagger_seeds=(2000,))
    fq, m, hist = rl.qat_distill(policy, 3, calib, cfg)
    assert len(hist) == 40 and not torch.equal(fq.fc1.weight, policy[0].weight)
    with torch.no_grad():
        assert torch.equal(fq(calib).argmax(1), m(calib).argmax(1))


def test_size_latency_agreement(policy, calib):
    assert rl.state_dict_bytes(rl.lowbit_ptq(policy, 2, calib)) < rl.state_dict_bytes(policy)
    assert 0 < rl.latency_ms(policy, calib[:1], repeats=20, warmup=2) < 1000
    assert rl.agreement(rl.greedy(policy), rl.greedy(policy), calib) == 1.0


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    with pytest.raises(ValueError, match="seeds"):
        rl.evaluate(simple_policy, [])
    with pytest.raises(ValueError, match="max_steps"):
        rl.evaluate(simple_policy, [0], max_steps=0)
    with pytest.raises(ValueError, match="hidden"):
        rl.policy_net(0)
    with pytest.raises(ValueError, match="shape"):
        rl.agreement(simple_policy, simple_policy, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="finite"):
        rl.agreement(simple_policy, simple_policy, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="repeats"):
        rl.latency_ms(rl.policy_net(), torch.zeros(1, 4), repeats=0)
    with pytest.raises(ValueError, match="num_bits"):
        rl.FakeQuantPolicy(rl.policy_net(), 1, rl.ActRanges((-1.0, 1.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="codes"):
        rl.pack_codes(torch.tensor([5]), 2)
    with pytest.raises(ValueError, match="num_envs"):
        rl.train_ppo(rl.PPOConfig(num_envs=0))
