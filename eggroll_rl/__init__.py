"""eggroll-rl: Evolution Strategies for PyTorch models and Gymnasium tasks, led by EGGROLL."""

from .core import EGGROLLTrainer, ESTrainer, VanillaESTrainer
from .policies import ObservationNormalizer, Policy, make_policy
from .population import BatchedFitness, Population, batched_fitness
from .rollout import EvalResult, RolloutFitness, evaluate, make_vec_env

__version__ = "0.1.0"
__all__ = [
    "BatchedFitness",
    "EGGROLLTrainer",
    "ESTrainer",
    "EvalResult",
    "ObservationNormalizer",
    "Policy",
    "Population",
    "RolloutFitness",
    "VanillaESTrainer",
    "__version__",
    "batched_fitness",
    "evaluate",
    "make_policy",
    "make_vec_env",
]
