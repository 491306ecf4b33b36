"""Multi-process training: identical to one process, uneven splits, faults, checkpoints, torchrun.

Each 2-process case is one launch (spawning costs ~1 s); the launched targets live in this module
so the spawned processes can import them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from eggroll_rl import BatchedFitness, EGGROLLTrainer, VanillaESTrainer
from eggroll_rl.agents import load_checkpoint, save_checkpoint
from eggroll_rl.distributed import DistributedError, World, stat_reduction
from eggroll_rl.launch import launch, run_distributed

import toy

ROOT = Path(__file__).resolve().parent.parent
# Wall-clock columns (and rates from them) measure each run's own speed, not shared state.
LOCAL_COLUMNS = {"time", "time_sample", "time_evaluate", "time_update", "steps_per_second", "rollout_seconds"}


# -- fitness functions and targets run inside the spawned processes --------------------------------
class CountingFitness(BatchedFitness):
    """The toy regression, reporting a per-rank count (summed over ranks) and a shared value."""

    stats_reduction: ClassVar[dict[str, str]] = {"members": "sum"}

    def __init__(self) -> None:
        self.stats = {}

    def __call__(self, population):
        self.stats = {"members": float(len(population)), "generation_seen": float(population.generation)}
        return toy.batched_regression(population)


class FaultyFitness(BatchedFitness):
    """The toy regression, except that rank ``rank`` raises, exits or hangs at ``generation``."""

    def __init__(self, rank: int, generation: int, mode: str) -> None:
        self.rank, self.generation, self.mode, self.stats = rank, generation, mode, {}

    def __call__(self, population):
        if population.world.rank == self.rank and population.generation == self.generation:
            if self.mode == "raise":
                raise ValueError(f"boom at generation {self.generation}")
            if self.mode == "exit":
                os._exit(7)
            time.sleep(600)
        return toy.batched_regression(population)


def build(case: str, fitness=None) -> EGGROLLTrainer | VanillaESTrainer:
    """Build one of the small deterministic problems."""
    if case == "eggroll8":
        return EGGROLLTrainer(toy.mlp(), fitness or toy.batched_regression, 8, 0.05, 0.1, rank=2, seed=3)
    if case == "eggroll7-stats":
        return EGGROLLTrainer(toy.mlp(), fitness or CountingFitness(), 7, 0.05, 0.1, seed=4, optimizer="adam")
    if case == "vanilla5-per-model":
        return VanillaESTrainer(toy.mlp(), fitness or toy.regression_fitness, 5, 0.05, 0.1, seed=5)
    raise ValueError(case)


def summary(trainer) -> dict:
    """Return what must agree across ranks and world sizes."""
    history = {k: v for k, v in trainer.history.items() if k not in LOCAL_COLUMNS}
    return {
        "params": trainer.current_params.clone(),
        "best": trainer.get_best_model().state_dict(),
        "best_fitness": trainer.best_fitness,
        "history": history,
    }


def digest(s: dict) -> str:
    h = hashlib.sha256(s["params"].numpy().tobytes())
    h.update(repr(sorted(s["history"].items())).encode())
    h.update(repr(s["best_fitness"]).encode())
    return h.hexdigest()


def train_cases(cases: list[str], generations: int) -> dict:
    """Train each case; return rank 0's summaries and whether every rank ended identical."""
    world = World.current()
    out = {}
    for case in cases:
        trainer = build(case)
        trainer.train(generations)
        s = summary(trainer)
        out[case] = {**s, "ranks_agree": len(set(world.all_gather_object(digest(s)))) == 1}
    return out


def train_with_fault(path: str, mode: str, timeout_note: bool = False) -> None:
    """Train 5 generations, checkpointing on rank 0 after each; rank 1 fails at generation 3."""
    trainer = build("eggroll8", FaultyFitness(rank=1, generation=3, mode=mode))
    world = trainer.world

    def checkpoint(generation, _):
        world.on_main(save_checkpoint, path, {"trainer": trainer.state_dict()})

    trainer.train(5, callback=checkpoint)


def rollout_case(generations: int) -> dict:
    """Train a CartPole policy with deterministic rollouts (no observation normaliser)."""
    import gymnasium as gym

    from eggroll_rl.policies import make_policy
    from eggroll_rl.rollout import RolloutFitness

    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, (16,), normalize_obs=False)
    env.close()
    fitness = RolloutFitness("CartPole-v1", seed=11, obs_norm=False, max_episode_steps=100)
    trainer = EGGROLLTrainer(policy, fitness, 8, 0.05, 0.1, seed=2)
    trainer.train(generations)
    s = summary(trainer)
    s["ranks_agree"] = len(set(World.current().all_gather_object(digest(s)))) == 1
    fitness.close()
    return s


class RaisesOnRank0(torch.nn.Module):
    """A policy whose forward raises in rank 0 (no fused kernel: rank 0 plays every episode)."""

    def __init__(self, policy) -> None:
        super().__init__()
        self.policy = policy
        self.preprocess, self.act = policy.preprocess, policy.act

    def forward(self, x):
        if World.current().rank == 0:
            raise ValueError("policy failed on rank 0")
        return self.policy(x)


EVAL_CASES = [
    # (name, env id, episodes, deterministic, backend, fused kernel)
    ("cartpole7", "CartPole-v1", 7, True, "auto", True),  # 4 + 3: uneven
    ("cartpole1", "CartPole-v1", 1, True, "auto", True),  # fewer episodes than ranks
    ("cartpole7-sampled", "CartPole-v1", 7, False, "sync", True),
    ("pendulum5-sampled", "Pendulum-v1", 5, False, "auto", True),  # Box actions, Gaussian noise
    ("pendulum3", "Pendulum-v1", 3, True, "auto", True),
    ("pendulum5-no-kernel", "Pendulum-v1", 5, True, "auto", False),  # rank 0 plays them all
    ("cartpole5-envpool", "CartPole-v1", 5, True, "envpool", True),  # cannot seed: rank 0 alone
]


def eval_policy(env_id: str):
    """A small policy with a non-trivial observation normaliser (fixed seed)."""
    import gymnasium as gym

    from eggroll_rl.policies import make_policy

    env = gym.make(env_id)
    policy = make_policy(env.observation_space, env.action_space, (8,), seed=1)
    env.close()
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    policy.obs_norm.update(torch.randn(64, policy.obs_dim, generator=torch.Generator().manual_seed(2)))
    policy.obs_norm.freeze()
    return policy


def evaluate_cases(cases: list[str]) -> dict:
    """Evaluate each case with the process group's world; return rank 0's results and the split."""
    import warnings

    from eggroll_rl import rollout

    world = World.current()
    played: list[tuple[int, int]] = []
    real = rollout._play

    def counting(*args, **kwargs):
        played.append((args[3], args[4]))  # (first, stop) episode indices
        return real(*args, **kwargs)

    rollout._play = counting
    out = {}
    for name, env_id, episodes, deterministic, backend, fused in EVAL_CASES:
        if name not in cases:
            continue
        policy = eval_policy(env_id)
        played.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # envpool: no common random numbers
            if not fused:
                rollout._center_kernel, saved = (lambda policy: None), rollout._center_kernel
            try:
                result = rollout.evaluate(
                    policy,
                    env_id,
                    episodes,
                    seed=5,
                    deterministic=deterministic,
                    backend=backend,
                    world=world,
                )
            finally:
                if not fused:
                    rollout._center_kernel = saved
        mine = (result.returns.tobytes(), result.lengths.tobytes(), result.mean, result.std)
        out[name] = {
            "returns": result.returns,
            "lengths": result.lengths,
            "mean": result.mean,
            "ranks_agree": len(set(world.all_gather_object(mine))) == 1,
            "played": world.all_gather_object(list(played)),
        }
    rollout._play = real
    return out


def evaluate_raising(where: str) -> dict:
    """Evaluate where rank 1's env raises (episodes split) or rank 0's policy raises (rank 0 alone).

    Every rank catches the DistributedError itself (no launcher safety net) and reports it.
    """
    import endless_env  # noqa: F401

    from eggroll_rl.rollout import evaluate

    world = World.current()
    try:
        if where == "env":
            policy = eval_policy("EggrollTest/Endless-v0")
            evaluate(policy, "EggrollTest/RaiseOnRank1-v0", 4, max_episode_steps=10, world=world)
        else:
            evaluate(RaisesOnRank0(eval_policy("Pendulum-v1")), "Pendulum-v1", 4, world=world)
    except DistributedError as exc:
        return {"error": str(exc), "failures": exc.failures, "ranks": world.all_gather_object(str(exc))}
    return {"error": None}


def train_run(out: str) -> dict:
    """Train a tiny CartPole run (evaluations at generation 2 and the final one at 3); return it."""
    from eggroll_rl import rollout
    from eggroll_rl.presets import apply_overrides, load_preset
    from eggroll_rl.run import train

    played: list[tuple[int, int]] = []
    real = rollout._play

    def counting(*args, **kwargs):
        played.append((args[3], args[4]))
        return real(*args, **kwargs)

    rollout._play = counting
    preset = apply_overrides(
        load_preset("CartPole-v1"),
        [
            "population=8",
            "generations=3",
            "eval.every=2",
            "eval.episodes=5",
            "stop_on_target=false",
            "hidden_sizes=4",
            "normalize_obs=false",
            "checkpoint_every=0",
        ],
    )
    try:
        result = train(preset, out)
    finally:
        rollout._play = real
    r = result.results
    keys = ("mean", "std", "eval_length_mean", "eval_env_steps", "env_steps", "generations")
    return {
        "results": {k: r.get(k) for k in keys},  # rank 0 alone writes the results
        "evals": [(row["eval_mean"], row["eval_std"]) for row in result.rows],
        "played": World.current().all_gather_object(played),
    }


# -- tests ------------------------------------------------------------------------------------------
def assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["params"], b["params"])
    assert a["best_fitness"] == b["best_fitness"]
    assert all(torch.equal(a["best"][k], b["best"][k]) for k in a["best"])
    assert a["history"].keys() == b["history"].keys()
    for k in a["history"]:
        assert a["history"][k] == pytest.approx(b["history"][k], nan_ok=True, rel=0, abs=0), k


def test_two_processes_match_one_bit_for_bit():
    cases = ["eggroll8", "eggroll7-stats", "vanilla5-per-model"]
    multi = run_distributed(2, train_cases, {"cases": cases, "generations": 3}, timeout=60)
    single = train_cases(cases, 3)
    for case in cases:
        assert multi[case]["ranks_agree"], case
        assert_same(single[case], multi[case])
    # Per-rank counts are summed (7 members split 4 + 3), shared values averaged.
    assert multi["eggroll7-stats"]["history"]["members"] == [7.0, 7.0, 7.0]
    assert multi["eggroll7-stats"]["history"]["generation_seen"] == [0.0, 1.0, 2.0]


def test_rollout_fitness_two_processes_match_one():
    pytest.importorskip("eggroll_rl.rollout")
    multi = launch(rollout_case, 2, 3, timeout=60)
    single = rollout_case(3)
    assert multi["ranks_agree"]
    assert_same(single, multi)
    assert single["history"]["env_steps"] == multi["history"]["env_steps"]


def test_rank_that_raises_stops_run_with_clear_error_and_checkpoint_resumes(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(DistributedError, match=r"rank 1 failed: ValueError: boom at generation 3") as info:
        launch(train_with_fault, 2, str(path), "raise", timeout=60)
    assert info.value.failures.keys() == {1}
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "rank 0 then stopped with: rank 1 failed: ValueError: boom" in notes  # rank 0 knew why
    assert "Traceback" in notes

    # The last checkpoint (after generation 3, written by rank 0) resumes in one process.
    state = load_checkpoint(path)["trainer"]
    assert state["generation"] == 3
    resumed = build("eggroll8")
    resumed.load_state_dict(state)
    resumed.train(2)
    straight = build("eggroll8")
    straight.train(5)
    assert torch.equal(resumed.current_params, straight.current_params)
    assert resumed.best_fitness == straight.best_fitness
    assert [f for f in resumed.history["fitness"]] == straight.history["fitness"]


def test_rank_that_dies_is_named_and_survivor_stops_by_itself(tmp_path):
    # A long grace: rank 0 must notice the dead peer itself (gloo: connection closed), not be killed.
    with pytest.raises(DistributedError, match=r"rank 1 failed: died with exit code 7") as info:
        launch(train_with_fault, 2, str(tmp_path / "c.pt"), "exit", timeout=20, grace=60)
    assert "rank 0 then stopped with: rank 0: collective" in "\n".join(info.value.__notes__)


def test_hung_rank_times_out():
    with pytest.raises(DistributedError, match=r"rank 1 failed: stopped responding") as info:
        launch(train_with_fault, 2, "/nonexistent/unused.pt", "hang", timeout=2, grace=1)
    assert "Timed out" in "\n".join(info.value.__notes__)


def test_torchrun_entry_point_matches_single_process():
    script = ROOT / "tests" / "torchrun_train.py"
    # This checkout's eggroll_rl, not whichever one is installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("params ")]
    assert len(lines) == 1  # only rank 0 prints
    single = build("eggroll8")
    single.train(3)
    assert lines[0] == "params " + hashlib.sha256(single.current_params.numpy().tobytes()).hexdigest()


def test_evaluations_split_over_two_processes_match_one_bit_for_bit():
    cases = [c[0] for c in EVAL_CASES]
    if importlib.util.find_spec("envpool") is None:
        cases.remove("cartpole5-envpool")
    multi = run_distributed(2, evaluate_cases, {"cases": cases}, timeout=120)
    single = evaluate_cases(cases)
    for name, _, episodes, *_ in EVAL_CASES:
        if name not in cases:
            continue
        m, s = multi[name], single[name]
        assert m["ranks_agree"], name
        assert m["returns"].tobytes() == s["returns"].tobytes(), name  # same bits, episode order
        assert m["lengths"].tobytes() == s["lengths"].tobytes(), name
        assert m["mean"] == s["mean"] and m["returns"].shape == (episodes,), name
        assert s["played"] == [[(0, episodes)]], name
    # Contiguous blocks: 7 = 4 + 3; a single episode goes to rank 0 and rank 1 plays none.
    assert multi["cartpole7"]["played"] == [[(0, 4)], [(4, 7)]]
    assert multi["cartpole1"]["played"] == [[(0, 1)], []]
    assert multi["pendulum5-sampled"]["played"] == [[(0, 3)], [(3, 5)]]
    # Without the row-independent kernel, or on envpool (no per-episode seeds), rank 0 plays all.
    assert multi["pendulum5-no-kernel"]["played"] == [[(0, 5)], []]
    if "cartpole5-envpool" in cases:
        assert multi["cartpole5-envpool"]["played"] == [[(0, 5)], []]
    # The cases are not trivially equal: lengths vary within an evaluation.
    assert len(set(single["cartpole7"]["lengths"].tolist())) > 1


def test_a_two_process_run_evaluates_like_one(tmp_path):
    multi = run_distributed(2, train_run, {"out": str(tmp_path / "two")}, timeout=120)
    single = train_run(str(tmp_path / "one"))
    assert multi["results"] == single["results"] and multi["evals"] == single["evals"]
    assert [m is not None for m, _ in single["evals"]] == [False, True, False]
    # The periodic evaluation and the final one, each shared 3 + 2 over the ranks.
    assert multi["played"] == [[(0, 3)] * 2, [(3, 5)] * 2]
    assert single["played"] == [[(0, 5)] * 2]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("env", r"rank 1 failed: RuntimeError: env exploded on rank 1 \(endless_env.py:\d+\)"),
        ("policy", r"rank 0 failed: ValueError: policy failed on rank 0 \(test_distributed.py:\d+\)"),
    ],
)
def test_a_rank_that_raises_in_an_evaluation_stops_every_rank_naming_it(where, message):
    # Long timeout and grace: a rank left waiting would be killed, not return `out`; only evaluate's
    # own status exchange lets both ranks return the same error.
    out = run_distributed(2, evaluate_raising, {"where": where}, timeout=300, grace=300)
    assert re.fullmatch(message, out["error"]) and len(out["failures"]) == 1
    assert out["ranks"] == [out["error"]] * 2  # both ranks raised the same DistributedError


# -- no processes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 7, 8, 13])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_member_slices_partition_the_population(n, size):
    slices = [World(r, size).member_slice(n) for r in range(size)]
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))
    assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


def test_single_process_world_helpers():
    world = World.init_from_env() if "WORLD_SIZE" not in os.environ else World()
    assert world == World() and world.is_main
    assert world.broadcast_object({"a": 1}) == {"a": 1}
    assert world.all_gather_object(3) == [3]
    assert world.reduce_stats({"x": 2}) == {"x": 2.0}
    assert world.on_main(lambda: 5) == 5
    world.barrier()
    with pytest.raises(KeyError):
        world.all_gather(torch.zeros(2), 2, error=KeyError("raised as is"))
    assert run_distributed(1, dict, {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="nproc"):
        run_distributed(0, dict)


def test_stat_reduction_and_error_message():
    assert stat_reduction("env_steps") == "mean"  # already reduced by the fitness: averaging is safe
    assert stat_reduction("members", {"members": "sum"}) == "sum"
    with pytest.raises(ValueError, match="stats_reduction"):
        stat_reduction("x", {"x": "median"})
    err = DistributedError({2: "OSError: disk", 1: "ValueError: x"})
    assert str(err) == "rank 1 failed: ValueError: x; rank 2 failed: OSError: disk" and err.rank == 1
