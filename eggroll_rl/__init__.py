"""eggroll-rl: Evolution Strategies for PyTorch models and Gymnasium tasks, led by EGGROLL."""

from .core import EGGROLLTrainer, ESTrainer, VanillaESTrainer
from .population import BatchedFitness, Population, batched_fitness

__version__ = "0.1.0"
__all__ = [
    "BatchedFitness",
    "EGGROLLTrainer",
    "ESTrainer",
    "Population",
    "VanillaESTrainer",
    "__version__",
    "batched_fitness",
]
