"""eggroll-rl: Evolution Strategies for PyTorch models and Gymnasium tasks, led by EGGROLL."""

import os as _os

# OpenMP threads (torch's and the C kernels') that spin while waiting for work take whole cores
# from other processes; on a busy machine that made training 15-40x slower. PASSIVE threads sleep
# instead. OpenMP reads this when its runtime loads, so it must be set before torch is imported
# (a user's own OMP_WAIT_POLICY wins; EGGROLL_RL_OMP_PASSIVE=0 keeps OpenMP's default).
if _os.environ.get("EGGROLL_RL_OMP_PASSIVE", "1") != "0":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .core import EGGROLLTrainer, ESTrainer, VanillaESTrainer
from .distributed import DistributedError, World
from .launch import launch, run_distributed
from .policies import ObservationNormalizer, Policy, make_policy
from .population import BatchedFitness, Population, batched_fitness
from .rollout import EvalResult, RolloutFitness, evaluate, make_vec_env

__version__ = "0.1.0"
__all__ = [
    "BatchedFitness",
    "DistributedError",
    "EGGROLLTrainer",
    "ESTrainer",
    "EvalResult",
    "ObservationNormalizer",
    "Policy",
    "Population",
    "RolloutFitness",
    "VanillaESTrainer",
    "World",
    "__version__",
    "batched_fitness",
    "evaluate",
    "launch",
    "make_policy",
    "make_vec_env",
    "run_distributed",
]
