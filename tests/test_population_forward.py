"""EGGROLL's batched population forward == the materialised per-member forward.

Member i's materialised model holds ``center + perturbations[i]`` (for a matrix
``W + sign_i sigma / sqrt(r) A_i B_i^T``, built densely by ``LowRankPerturbations.__getitem__``);
the batched forward never forms it. Every variant of the Linear forward (rank 1 and rank > 1,
shared / per-member / no bias, 2-D and (N, k, ..., in) inputs, frozen weights) and the LayerNorm
forward are checked on random members, on both paths: the compiled CPU kernels and the PyTorch
ops (``population._linear``). On the kernel path a `Policy` (which describes itself with
``mlp_plan``) runs whole in one fused call (``kernels.MLPKernel``), other models layer by layer
(``population._kernel_linear``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from gymnasium import spaces
from torch import nn

from eggroll_rl import EGGROLLTrainer, VanillaESTrainer, batched_fitness, kernels, make_policy


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def forward_path(request, monkeypatch):
    """Run every test on the compiled-kernel path and on the PyTorch-ops path."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("no compiled CPU kernel here (no C compiler)")
    if request.param == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


@batched_fitness
def _unused(population):
    return torch.zeros(len(population))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    if kind == "nobias":
        return nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
    if kind == "layernorm":
        return nn.Sequential(
            nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3, bias=False), nn.LayerNorm(3)
        )
    if kind == "ln_noaffine":
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 3))
    if kind == "ln_nobias":
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16, bias=False), nn.Linear(16, 3))
    if kind.startswith("policy"):
        activation, hidden, norm = {
            "policy": ("tanh", (16, 16), True),
            "policy_relu": ("relu", (37,), False),
            "policy_linear": ("tanh", (), True),
            "policy_elu": ("elu", (16,), True),  # an activation the fused kernel does not compute
        }[kind]
        obs = spaces.Box(-float("inf"), float("inf"), (6,))
        policy = make_policy(obs, spaces.Discrete(3), hidden, activation, norm)
        with torch.no_grad():
            policy.net[-1].weight.normal_()  # a head far from its near-zero start
        if norm:
            policy.obs_norm.update(torch.randn(200, 6) * torch.tensor([0.1, 1, 2, 3, 5, 10]) + 1)
            policy.obs_norm.freeze()
        return policy
    if kind == "frozen_weight":  # a Linear whose weight is not trained: no low-rank factors
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        model[0].weight.requires_grad_(False)
        return model
    raise ValueError(kind)


def _check(kind: str, rank: int, noise_reuse: int, lead: tuple[int, ...], freeze: bool = False) -> None:
    n = 8
    model = _model(kind)
    trainer = EGGROLLTrainer(
        model,
        _unused,
        population_size=n,
        sigma=0.3,
        rank=rank,
        noise_reuse=noise_reuse,
        freeze_nonlora=freeze,
        seed=3,
    )
    trainer.generation = 5  # any generation, not just the first
    perturbations = trainer.sample_perturbations(n)
    pop = trainer.make_population(perturbations, torch.arange(n))
    x = torch.randn(n, *lead, 6)
    batched = pop(x)
    assert batched.shape == (n, *lead, 3)
    views = trainer._params.views
    buffers = dict(model.named_buffers())
    for i in torch.randperm(n)[:4].tolist():
        params = views(trainer.current_params + perturbations[i])
        with torch.no_grad():
            expected = torch.func.functional_call(model, (params, buffers), (x[i],))
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-5)
    # argmax over the outputs, fused where the kernel runs the whole model
    assert torch.equal(pop.argmax(x), batched.argmax(-1))
    _check_member_map(pop, lambda i: views(trainer.current_params + perturbations[i]), model, lead, n)
    # the population leaves the model's own forward untouched
    assert all("forward" not in m.__dict__ for m in model.modules())


def _check_member_map(pop, params_of, model: nn.Module, lead: tuple[int, ...], n: int) -> None:
    """``pop(x, members=idx)`` == member ``idx[j]``'s dense model on row ``j``: a random mix with
    repeats (more rows than members, members missing), a single row, and an empty batch."""
    buffers = dict(model.named_buffers())
    gen = torch.Generator().manual_seed(1)
    for rows in (11, 1, 0):
        idx = torch.randint(0, n, (rows,), generator=gen)
        if rows == 11:
            idx[:3] = torch.tensor([n - 1, 0, n - 1])  # both ends, and a repeat
        x = torch.randn(rows, *lead, 6, generator=gen)
        out = pop(x, members=idx)
        assert out.shape == (rows, *lead, 3)
        for j, i in enumerate(idx.tolist()):
            with torch.no_grad():
                expected = torch.func.functional_call(model, (params_of(i), buffers), (x[j],))
            torch.testing.assert_close(out[j], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(pop.argmax(x, members=idx), out.argmax(-1))
    with pytest.raises(ValueError, match=r"members must lie in \[0, 8\)"):
        pop(torch.randn(2, *lead, 6), members=torch.tensor([0, n]))
    with pytest.raises(ValueError, match="members must lie"):
        pop.argmax(torch.randn(1, *lead, 6), members=torch.tensor([-1]))
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        pop(torch.randn(3, *lead, 6), members=torch.tensor([0, 1]))


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("noise_reuse", [0, 2])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["2d", "3d", "4d"])
def test_mlp_matches_materialised(rank: int, noise_reuse: int, lead: tuple[int, ...]) -> None:
    _check("mlp", rank, noise_reuse, lead)


@pytest.mark.parametrize("kind", ["nobias", "layernorm", "ln_noaffine", "ln_nobias", "frozen_weight"])
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("lead", [(), (5,)], ids=["2d", "3d"])
def test_module_kinds_match_materialised(kind: str, rank: int, lead: tuple[int, ...]) -> None:
    _check(kind, rank, 0, lead)


@pytest.mark.parametrize("kind", ["policy", "policy_relu", "policy_linear", "policy_elu"])
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("noise_reuse", [0, 2])
@pytest.mark.parametrize("lead", [(), (5,)], ids=["2d", "3d"])
def test_policies_match_materialised(kind: str, rank: int, noise_reuse: int, lead: tuple[int, ...]) -> None:
    _check(kind, rank, noise_reuse, lead)


@pytest.mark.parametrize("kind", ["policy", "policy_relu"])
def test_policy_freeze_nonlora_matches_materialised(kind: str) -> None:
    _check(kind, 2, 2, (), freeze=True)


@pytest.mark.parametrize("kind, fused", [("policy", True), ("policy_elu", False), ("mlp", False)])
def test_policies_run_whole_in_one_kernel_call(forward_path, monkeypatch, kind: str, fused: bool) -> None:
    """A Policy with supported activations is one fused call per forward; the rest go layer by layer."""
    calls = []
    real = kernels.MLPKernel.__call__
    monkeypatch.setattr(kernels.MLPKernel, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = EGGROLLTrainer(_model(kind), _unused, population_size=4, sigma=0.1)
    pop = trainer.make_population(trainer.sample_perturbations(4), torch.arange(4))
    pop(torch.randn(4, 6))
    pop.argmax(torch.randn(4, 6))
    assert len(calls) == (2 if forward_path == "kernel" and fused else 0)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("lead", [(), (5,)], ids=["2d", "3d"])
def test_freeze_nonlora_shared_bias(rank: int, lead: tuple[int, ...]) -> None:
    _check("layernorm", rank, 2, lead, freeze=True)


def test_forward_with_lowrank_zero_perturbation_is_plain_inference() -> None:
    """With the noise zeroed the batched forward is exactly the model's own batched forward."""
    model = _model("mlp")
    trainer = EGGROLLTrainer(model, _unused, population_size=4, sigma=0.1, rank=1)
    perturbations = trainer.sample_perturbations(4)
    perturbations.noise.zero_()
    table, offsets = perturbations.source  # what the CPU kernel reads instead of `noise`
    perturbations.source = (torch.zeros_like(table), offsets)
    pop = trainer.make_population(perturbations, torch.arange(4))
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(pop(x), model(x), rtol=1e-6, atol=1e-6)


def test_population_subset_of_members() -> None:
    """A population of some members (one process's share) runs those members' perturbations."""
    model = _model("mlp")
    trainer = EGGROLLTrainer(model, _unused, population_size=8, sigma=0.2, rank=2, noise_reuse=2)
    perturbations = trainer.sample_perturbations(8)
    indices = torch.tensor([5, 6, 7])
    pop = trainer.make_population(perturbations, indices)
    x = torch.randn(3, 6)
    out = pop(x)
    for row, i in enumerate(indices.tolist()):
        params = trainer._params.views(trainer.current_params + perturbations[i])
        with torch.no_grad():
            expected = torch.func.functional_call(model, params, (x[row],))
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("noise_reuse", [0, 2])
def test_contract_is_weighted_sum_of_member_directions(rank: int, noise_reuse: int) -> None:
    """``contract(w) == sum_i w_i p[i] / sigma`` (the update's single low-rank contraction)."""
    model = _model("layernorm")
    trainer = EGGROLLTrainer(model, _unused, population_size=8, sigma=0.3, rank=rank, noise_reuse=noise_reuse)
    perturbations = trainer.sample_perturbations(8)
    w = torch.randn(8)
    expected = sum(w[i] * perturbations[i] for i in range(8)) / perturbations.sigma
    torch.testing.assert_close(perturbations.contract(w), expected, rtol=1e-5, atol=1e-5)


def test_cpu_population_runs_the_kernel_when_available(forward_path, monkeypatch) -> None:
    """Each low-rank Linear goes through the kernel on the kernel path, and never on the other."""
    calls = []
    real = kernels.LowRankRows.__call__
    monkeypatch.setattr(kernels.LowRankRows, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model("mlp")
    trainer = EGGROLLTrainer(model, _unused, population_size=4, sigma=0.1)
    pop = trainer.make_population(trainer.sample_perturbations(4), torch.arange(4))
    pop(torch.randn(4, 6))
    assert len(calls) == (3 if forward_path == "kernel" else 0)
    if forward_path == "kernel":  # the kernel reads raw float32 memory: other dtypes are refused
        with pytest.raises(TypeError, match="float32"):
            pop(torch.randn(4, 6, dtype=torch.float64))


# -- the fused path only for a model that is exactly what the kernel computes ----------------------


class _Scale(nn.Module):
    """A parameter-free module the fused kernel knows nothing about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.5


class _DoubledTanh(nn.Tanh):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * x)


class _LoudPolicy(type(make_policy(spaces.Box(-1, 1, (1,)), spaces.Discrete(2)))):
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return super().forward(obs) * 3 - 1


def _scale_output(module, args, output):
    return output * 2


def _shift_input(module, args):
    return (args[0] + 0.5,)


def _altered_policy(change: str) -> nn.Module:
    """A 6-in, 3-action tanh Policy with one structural change the fused kernel would ignore."""
    torch.manual_seed(1)
    obs = spaces.Box(-float("inf"), float("inf"), (6,))
    cls = _LoudPolicy if change == "subclass_forward" else type(make_policy(obs, spaces.Discrete(3)))
    policy = cls(obs, spaces.Discrete(3), (16, 16), "tanh", True)
    with torch.no_grad():
        policy.net[-1].weight.normal_()
    policy.obs_norm.update(torch.randn(200, 6) * 2 + 1)
    policy.obs_norm.freeze()
    net = policy.net  # Linear, Tanh, Linear, Tanh, Linear
    if change == "layernorm_after_activation":
        net.insert(2, nn.LayerNorm(16))
    elif change == "scale_first":
        net.insert(0, _Scale())
    elif change == "scale_middle":
        net.insert(2, _Scale())
    elif change == "scale_last":
        net.append(_Scale())
    elif change == "tanh_subclass":
        net[1] = _DoubledTanh()
    elif change == "forward_hook":
        net[2].register_forward_hook(_scale_output)
    elif change == "pre_hook_on_policy":
        policy.register_forward_pre_hook(_shift_input)
    elif change == "instance_forward":
        policy.obs_norm.forward = lambda x: x * 0.5
    elif change == "normalizer_subclass":

        class Unclipped(type(policy.obs_norm)):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return (x - self.mean) / self.std

        norm = Unclipped(6)
        norm.load_state_dict(policy.obs_norm.state_dict())
        policy.obs_norm = norm
    elif change == "negative_clip":
        policy.obs_norm.clip = -1.0
    elif change == "extra_buffer":
        net[0].register_buffer("gain", torch.ones(16))
    elif change != "none" and change != "subclass_forward":
        raise ValueError(change)
    return policy


_CHANGES = [
    "layernorm_after_activation",
    "scale_first",
    "scale_middle",
    "scale_last",
    "tanh_subclass",
    "subclass_forward",
    "forward_hook",
    "pre_hook_on_policy",
    "instance_forward",
    "normalizer_subclass",
    "negative_clip",
    "extra_buffer",
    "global_hook",
]


def _members_one_by_one(trainer, model: nn.Module, perturbations, x: torch.Tensor) -> torch.Tensor:
    """Each member's dense weights (center + its materialised perturbation) in a model copy, run alone."""
    views = trainer._params.views
    outs = []
    for i in range(x.shape[0]):
        member = copy.deepcopy(model)
        params = views(trainer.current_params + perturbations[i])
        with torch.no_grad():
            for name, t in member.named_parameters():
                t.copy_(params[name])
            outs.append(member(x[i]))
    return torch.stack(outs)


@pytest.mark.parametrize("change", ["none", *_CHANGES])
@pytest.mark.parametrize("rank", [1, 3])
def test_altered_policies_are_not_fused_and_match_members(forward_path, monkeypatch, change, rank) -> None:
    """An inserted module, a hook, an overridden forward... -> not fused, and every member is exact."""
    calls = []
    real = kernels.MLPKernel.__call__
    monkeypatch.setattr(kernels.MLPKernel, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    policy = _altered_policy("none" if change == "global_hook" else change)
    n = 6
    handle = (
        nn.modules.module.register_module_forward_hook(_scale_output) if change == "global_hook" else None
    )
    try:
        trainer = EGGROLLTrainer(policy, _unused, population_size=n, sigma=0.3, rank=rank, seed=4)
        perturbations = trainer.sample_perturbations(n)
        pop = trainer.make_population(perturbations, torch.arange(n))
        x = torch.randn(n, 6) * 3
        out, actions = pop(x), pop.argmax(x)
        expected = _members_one_by_one(trainer, policy, perturbations, x)
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actions, expected.argmax(-1))
    fused = forward_path == "kernel" and change == "none"
    assert len(calls) == (2 if fused else 0)


def test_argmax_agrees_with_torch_on_nan_outputs(forward_path) -> None:
    """NaN outputs (inf - inf in the head) count as the maximum, the first NaN wins, on every path."""
    torch.manual_seed(2)
    obs = spaces.Box(-float("inf"), float("inf"), (6,))
    policy = make_policy(obs, spaces.Discrete(4), (16,), "tanh", False)
    with torch.no_grad():
        head = policy.net[-1].weight
        head.normal_()
        head[1, :2] = torch.tensor([float("inf"), -float("inf")])  # NaN where h0, h1 share a sign
        head[3, :2] = torch.tensor([float("inf"), -float("inf")])
        head[2, 2] = float("inf")  # +inf or -inf (or NaN at h2 = 0) elsewhere
    n = 64
    trainer = EGGROLLTrainer(policy, _unused, population_size=n, sigma=0.1, rank=2, seed=1)
    perturbations = trainer.sample_perturbations(n)
    pop = trainer.make_population(perturbations, torch.arange(n))
    x = torch.randn(n, 6)
    out = pop(x)
    expected = _members_one_by_one(trainer, policy, perturbations, x)
    assert out[:, 1].isnan().any() and not out[:, 1].isnan().all()  # both kinds of rows occur
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(pop.argmax(x), expected.argmax(-1))
    assert torch.equal(pop.argmax(x), out.argmax(-1))


class _PlanIgnoresLayerNorm(nn.Module):
    """A model whose mlp_plan() leaves out a LayerNorm its forward runs: the population must not trust it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.l1, self.norm, self.l2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)
        with torch.no_grad():
            self.norm.weight.mul_(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.norm(torch.tanh(self.l1(x))))

    def mlp_plan(self):
        return None, [(self.l1, "tanh"), (self.l2, "identity")]


def _exact_and_fused(model: nn.Module, monkeypatch) -> bool:
    """Check a 4-member population of ``model`` (6 inputs) member by member; return whether it was fused."""
    calls = []
    real = kernels.MLPKernel.__call__
    monkeypatch.setattr(kernels.MLPKernel, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = EGGROLLTrainer(model, _unused, population_size=4, sigma=0.3, rank=2, seed=2)
    perturbations = trainer.sample_perturbations(4)
    pop = trainer.make_population(perturbations, torch.arange(4))
    x = torch.randn(4, 6)
    expected = _members_one_by_one(trainer, model, perturbations, x)
    torch.testing.assert_close(pop(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(pop.argmax(x), expected.argmax(-1))
    return calls != []


def test_a_plan_that_omits_parameters_is_not_fused(forward_path, monkeypatch) -> None:
    assert not _exact_and_fused(_PlanIgnoresLayerNorm(), monkeypatch)


class _OwnPlan(nn.Module):
    """Not a Policy: two Linear layers with a tanh between, described exactly by its mlp_plan()."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))

    def mlp_plan(self):
        return None, [(self.l1, "tanh"), (self.l2, "identity")]


@pytest.mark.parametrize("change", ["none", "forward_hook", "pre_hook"])
def test_a_model_of_its_own_plan_is_fused_only_when_calling_it_runs_the_plan(
    forward_path, monkeypatch, change
) -> None:
    """Any model may offer mlp_plan(); a hook its plan cannot see -> not fused, every member exact."""
    model = _OwnPlan()
    if change == "forward_hook":
        model.l2.register_forward_hook(_scale_output)
    elif change == "pre_hook":
        model.register_forward_pre_hook(_shift_input)
    assert _exact_and_fused(model, monkeypatch) == (forward_path == "kernel" and change == "none")


@pytest.mark.parametrize("lead", [(), (5,)], ids=["2d", "3d"])
def test_full_rank_population_member_map(lead: tuple[int, ...]) -> None:
    """The dense (vmap) population takes the same rows -> member map."""
    n = 8
    model = _model("mlp")
    trainer = VanillaESTrainer(model, _unused, population_size=n, sigma=0.3, seed=2)
    perturbations = trainer.sample_perturbations(n)
    pop = trainer.make_population(perturbations, torch.arange(n))
    views = trainer._params.views
    _check_member_map(pop, lambda i: views(trainer.current_params + perturbations[i]), model, lead, n)
