"""Policies built from Gymnasium spaces and the observation normaliser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space
from torch import nn

from eggroll_rl.policies import ACTIVATIONS, ObservationNormalizer, make_policy

BOX4 = spaces.Box(-1.0, 1.0, (4,), np.float32)


def batch_of(space: spaces.Space, n: int, seed: int = 0):
    """Sample a vector-env style batch of `n` observations of `space`."""
    batched = batch_space(space, n)
    batched.seed(seed)
    return batched.sample()


def flatten_rows(space: spaces.Space, batch, n: int) -> np.ndarray:
    """Flatten each row with gymnasium's own `flatten` (the reference order)."""
    rows = []
    for i in range(n):
        item = _row(batch, i)
        rows.append(spaces.flatten(space, item).astype(np.float32))
    return np.stack(rows)


def _row(batch, i):
    if isinstance(batch, dict):
        return {k: _row(v, i) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_row(v, i) for v in batch)
    return batch[i]


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(-np.inf, np.inf, (3, 2), np.float64),
        spaces.Box(0, 255, (2, 2, 3), np.uint8),
        spaces.Discrete(5, start=-2),
        spaces.MultiDiscrete([[3, 2], [4, 2]]),
        spaces.MultiBinary(6),
        spaces.Dict(
            {"pos": spaces.Box(-1, 1, (2,)), "mode": spaces.Discrete(3), "bits": spaces.MultiBinary(2)}
        ),
        spaces.Tuple((spaces.Discrete(2), spaces.Dict({"b": BOX4, "a": spaces.Discrete(4, start=1)}))),
    ],
    ids=["box2d", "box_uint8", "discrete", "multidiscrete", "multibinary", "dict", "tuple_nested"],
)
def test_preprocess_matches_gymnasium_flatten(space):
    policy = make_policy(space, spaces.Discrete(2), hidden_sizes=(8,))
    n = 7
    batch = batch_of(space, n)
    x = policy.preprocess(batch)
    assert x.dtype == torch.float32
    assert x.shape == (n, policy.obs_dim) == (n, spaces.flatdim(space))
    np.testing.assert_allclose(x.numpy(), flatten_rows(space, batch, n))
    assert policy(x).shape == (n, 2)


@pytest.mark.parametrize(
    "space",
    [
        spaces.Discrete(4, start=3),
        spaces.MultiDiscrete([3, 5, 2]),
        spaces.MultiDiscrete([[2, 2], [2, 2]], start=[[1, 1], [-1, 0]]),
        spaces.MultiBinary([2, 3]),
        spaces.Box(-2.0, 3.0, (2, 2), np.float32),
        spaces.Box(-np.inf, np.inf, (3,), np.float32),
    ],
    ids=["discrete_start", "multidiscrete", "multidiscrete_2d_start", "multibinary", "box", "unbounded"],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_act_gives_valid_batched_actions(space, deterministic):
    policy = make_policy(BOX4, space, hidden_sizes=(8,))
    n = 64
    outputs = torch.randn(n, policy.act_dim) * 3
    actions = policy.act(outputs, deterministic=deterministic, rng=np.random.default_rng(0))
    assert isinstance(actions, np.ndarray)
    assert batch_space(space, n).contains(actions), actions


def test_discrete_argmax_respects_start_and_ties():
    policy = make_policy(BOX4, spaces.Discrete(3, start=10))
    out = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(policy.act(out), [11, 10, 10])
    binary = make_policy(BOX4, spaces.Discrete(2, start=-1))
    np.testing.assert_array_equal(binary.act(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])), [0, -1, -1])


def test_multidiscrete_argmax_per_segment():
    policy = make_policy(BOX4, spaces.MultiDiscrete([2, 3]))
    out = torch.tensor([[0.0, 1.0, 5.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0, 9.0]])
    np.testing.assert_array_equal(policy.act(out), [[1, 0], [0, 2]])


def test_multibinary_thresholds_at_zero():
    policy = make_policy(BOX4, spaces.MultiBinary(3))
    np.testing.assert_array_equal(policy.act(torch.tensor([[1.0, -1.0, 0.0]])), [[1, 0, 0]])


def test_box_actions_squashed_into_bounds():
    low, high = np.array([-2.0, 0.0, 10.0]), np.array([1.0, 5.0, 10.5])
    space = spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
    policy = make_policy(BOX4, space)
    huge = torch.tensor([[1e6, -1e6, 1e6], [-1e6, 1e6, -1e6], [0.0, 0.0, 0.0]])
    a = policy.act(huge)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a[0], [1.0, 0.0, 10.5])
    np.testing.assert_allclose(a[1], [-2.0, 5.0, 10.0])
    np.testing.assert_allclose(a[2], (low + high) / 2)  # neutral output -> centre of the box
    wild = policy.act(torch.randn(1000, 3) * 100, deterministic=False, rng=np.random.default_rng(1))
    assert (wild >= space.low).all() and (wild <= space.high).all()


def test_unbounded_box_is_identity():
    space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
    policy = make_policy(BOX4, space)
    out = torch.tensor([[1.5, -300.0]])
    a = policy.act(out)
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, [[1.5, -300.0]])


@pytest.mark.parametrize(
    ("obs_space", "act_space", "side", "name"),
    [
        (spaces.Text(5), spaces.Discrete(2), "observation", "Text"),
        (spaces.Sequence(BOX4), spaces.Discrete(2), "observation", "Sequence"),
        (spaces.Graph(BOX4, spaces.Discrete(2)), spaces.Discrete(2), "observation", "Graph"),
        (spaces.Dict({"ok": BOX4, "bad": spaces.Text(3)}), spaces.Discrete(2), "observation", "Text"),
        (BOX4, spaces.Text(5), "action", "Text"),
        (BOX4, spaces.Dict({"a": spaces.Discrete(2)}), "action", "Dict"),
        (
            BOX4,
            spaces.Box(np.array([-1.0, -np.inf], np.float32), np.array([1.0, np.inf], np.float32)),
            "action",
            "Box",
        ),
        (BOX4, spaces.Box(0.0, np.inf, (2,)), "action", "Box"),
    ],
    ids=[
        "text",
        "sequence",
        "graph",
        "dict_with_text",
        "act_text",
        "act_dict",
        "act_mixed_box",
        "act_half_box",
    ],
)
def test_unsupported_spaces_raise_clearly(obs_space, act_space, side, name):
    with pytest.raises(ValueError, match=rf"Unsupported {side} space {name}") as info:
        make_policy(obs_space, act_space)
    assert "supported" in str(info.value)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match=r"swish.*tanh"):
        make_policy(BOX4, spaces.Discrete(2), activation="swish")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations_build_and_run(activation):
    policy = make_policy(BOX4, spaces.Discrete(2), hidden_sizes=(5, 3), activation=activation)
    assert policy(torch.randn(2, 3, 4)).shape == (2, 3, 2)


def test_only_linear_layers_are_trainable_and_normaliser_has_buffers_only():
    policy = make_policy(BOX4, spaces.Discrete(3), hidden_sizes=(16, 8))
    for module in policy.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert type(module) is nn.Linear
    assert list(policy.obs_norm.parameters()) == []
    assert {"obs_norm.mean", "obs_norm.std", "obs_norm.count"} <= set(policy.state_dict())
    assert [m.out_features for m in policy.modules() if isinstance(m, nn.Linear)] == [16, 8, 3]


def test_initial_policy_is_near_neutral():
    space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    policy = make_policy(spaces.Box(-10, 10, (6,)), space)
    out = policy(torch.randn(100, 6) * 3)
    assert out.abs().max() < 0.1


def test_config_round_trip_rebuilds_same_policy():
    obs_space = spaces.Dict({"x": BOX4, "k": spaces.Discrete(3)})
    act_space = spaces.Box(-1, 1, (2,))
    policy = make_policy(obs_space, act_space, hidden_sizes=(7, 5), activation="elu", normalize_obs=True)
    policy.obs_norm.update(torch.randn(50, policy.obs_dim))
    policy.obs_norm.freeze()
    config = json.loads(json.dumps(policy.config))
    clone = make_policy(obs_space, act_space, **config)
    clone.load_state_dict(policy.state_dict(), strict=True)
    x = policy.preprocess(batch_of(obs_space, 9))
    torch.testing.assert_close(clone(x), policy(x))
    assert make_policy(BOX4, act_space, normalize_obs=False).obs_norm is None


def test_normalizer_statistics_match_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal([3.0, -1.0, 0.0], [2.0, 0.5, 0.01], size=(1000, 3))
    norm = ObservationNormalizer(3, clip=5.0, eps=1e-2)
    x = torch.from_numpy(data).float()
    assert torch.equal(norm(x), x.clamp(-5, 5))  # no statistics yet: identity (clipped)
    for chunk in np.array_split(data, 7):
        norm.update(chunk)
    # Frozen: updates alone do not change the normalisation used by forward.
    assert torch.equal(norm.mean, torch.zeros(3)) and torch.equal(norm.std, torch.ones(3))
    norm.freeze()
    mean, var = data.mean(0), data.var(0)
    np.testing.assert_allclose(norm.count.item(), 1000)
    np.testing.assert_allclose(norm.mean.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.std.numpy(), np.sqrt(np.maximum(var, 1e-2)), rtol=1e-5)
    expected = np.clip((data - mean) / np.sqrt(np.maximum(var, 1e-2)), -5, 5)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert norm(torch.tensor([[1e6, -1e6, 0.0]])).abs().max() == 5.0


def test_normalizer_reduce_sum_combines_ranks():
    data = torch.randn(40, 2, dtype=torch.float64) * 3 + 1
    one, two = ObservationNormalizer(2), ObservationNormalizer(2)
    one.update(data)
    two.update(data, reduce_sum=lambda t: 2 * t)  # two ranks that saw the same data
    one.freeze()
    two.freeze()
    assert two.count.item() == 2 * one.count.item() == 80
    torch.testing.assert_close(two.mean, one.mean)
    torch.testing.assert_close(two.std, one.std)
