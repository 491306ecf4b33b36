"""Train the toy problem under torchrun; rank 0 prints the parameters' digest (used by a test)."""

import hashlib

from test_distributed import build

from eggroll_rl.distributed import World

if __name__ == "__main__":
    world = World.init_from_env()
    assert world.size == 2, world
    trainer = build("eggroll8")
    trainer.train(3)
    if world.is_main:
        print("params " + hashlib.sha256(trainer.current_params.numpy().tobytes()).hexdigest(), flush=True)
    World.shutdown()
