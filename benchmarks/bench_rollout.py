"""The training loop's time per env step vs its floor: one plain policy forward + one raw env step.

CartPole-v1, N = 1024 members, policy MLP 4-64-64-2 (tanh, observation normaliser). The center is
first trained until episodes are long (so a generation is hundreds of lockstep steps, as in the
regime that matters), then, in the same process:

(a) the whole training loop's time per env step: ``sum(generation time) / sum(lockstep steps)``
    over the timed generations — noise, population preparation, every forward, env steps,
    return accounting, shaping and the update included;
(b) the floor: the median of one unperturbed batched ``policy(x)`` on ``(N, 4)`` observations plus
    one raw ``CartPoleVectorEnv.step`` of N sub-envs, interleaved, many repeats.

On CPU the loop runs the policy through the fused kernel (``kernels.MLPKernel``: the whole
perturbed forward and the argmax in one C call per step); the floor's forward is PyTorch's. For
scale, the same kernel's unperturbed forward (the center alone) is timed after the floor, in a
loop of its own, and printed as "kernel plain". ``EGGROLL_RL_KERNEL=0`` times the PyTorch-ops loop instead.

    python benchmarks/bench_rollout.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from eggroll_rl import EGGROLLTrainer, RolloutFitness, kernels, make_policy
from eggroll_rl.rollout import make_vec_env


def center_kernel(policy) -> kernels.MLPKernel | None:
    """The fused kernel for the unperturbed policy, where it can be built."""
    if not kernels.available():
        return None
    normalizer, stack = policy.mlp_plan()
    layers = [kernels.MLPLayer(mod.weight, mod.bias, act) for mod, act in stack]
    return kernels.MLPKernel(layers, normalizer)


def floor_per_step(policy: torch.nn.Module, n: int, repeats: int) -> dict[str, float]:
    """Median seconds of one plain policy forward and one raw vector-env step (interleaved)."""
    env = make_vec_env("CartPole-v1", n)
    obs, _ = env.reset(seed=0)
    fwd, step, kernel = [], [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = policy(torch.from_numpy(obs))
            t1 = time.perf_counter()
            actions = out.argmax(-1).numpy()
            t2 = time.perf_counter()
            obs, *_ = env.step(actions)
            t3 = time.perf_counter()
            fwd.append(t1 - t0)
            step.append(t3 - t2)
        # The kernel in a loop of its own, so that it cannot disturb the floor's caches.
        fused = center_kernel(policy)
        for _ in range(repeats if fused is not None else 0):
            t0 = time.perf_counter()
            fused(torch.from_numpy(obs))
            kernel.append(time.perf_counter() - t0)
    env.close()
    return {
        "forward": statistics.median(fwd),
        "env_step": statistics.median(step),
        "kernel": statistics.median(kernel) if kernel else float("nan"),
    }


def main() -> None:
    """Train to long episodes, then time the loop and its floor side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generations", type=int, default=5, help="timed generations")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of loop and floor timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = gym.make("CartPole-v1")
    torch.manual_seed(0)
    policy = make_policy(env.observation_space, env.action_space, hidden_sizes=(64, 64))
    fitness = RolloutFitness("CartPole-v1", seed=0)
    trainer = EGGROLLTrainer(
        model=policy,
        fitness_fn=fitness,
        population_size=args.population,
        learning_rate=0.1,
        sigma=0.1,
        noise_reuse=2,
        seed=0,
        fitness_shaping="centered_rank",
        optimizer="adam",
    )
    while trainer.generation < 60 and (not trainer.history or trainer.history["mean_fitness"][-1] < 300):
        trainer.step()
    print(f"warm-up: {trainer.generation} generations, mean return {trainer.history['mean_fitness'][-1]:.0f}")

    loops, floors, rollouts, strict = [], [], [], []
    for _ in range(args.rounds):
        time_total = steps = rollout_time = 0.0
        for _ in range(args.generations):
            stats = trainer.step()
            time_total += stats["time"]
            steps += stats["lockstep_steps"]
            rollout_time += stats["rollout_seconds"]
        loops.append(time_total / steps)
        rollouts.append(rollout_time / steps)
        floor = floor_per_step(trainer.model, args.population, 2000)
        floors.append(floor["forward"] + floor["env_step"])
        strict.append(floor["kernel"] + floor["env_step"])
        print(
            f"  round: loop {1e6 * loops[-1]:.0f} us/step (rollout only {1e6 * rollouts[-1]:.0f}), "
            f"floor {1e6 * floor['forward']:.0f} + {1e6 * floor['env_step']:.0f} us "
            f"(kernel plain {1e6 * floor['kernel']:.0f}), "
            f"mean episode {stats['episode_length_mean']:.0f}, lockstep {stats['lockstep_steps']:.0f}"
        )
    loop, floor_t = float(np.median(loops)), float(np.median(floors))
    print(
        f"\nN={args.population}, threads={args.threads}: (a) loop {1e6 * loop:.0f} us/env step, "
        f"(b) forward + env step {1e6 * floor_t:.0f} us; (b)/(a) = {floor_t / loop:.2f} "
        f"(rollout only: {floor_t / float(np.median(rollouts)):.2f})"
    )
    if not np.isnan(strict).any():
        # A stricter floor: the fused kernel's own unperturbed forward instead of PyTorch's.
        print(f"with the kernel's plain forward as the floor: {float(np.median(strict)) / loop:.2f}")


if __name__ == "__main__":
    main()
