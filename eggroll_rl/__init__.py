"""eggroll-rl: Evolution Strategies for PyTorch models and Gymnasium tasks, led by EGGROLL."""

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
