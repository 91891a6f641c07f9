"""Rollout generation for RL: engine processes (pure-torch or vLLM) and weight sync from the trainer.

    from rollout import EnginePool, SamplingParams, WeightSync
    pool = EnginePool.start(model_path, num_engines=2) if rank == 0 else None   # rollout/pool.py
    sync = WeightSync(pool)                                                      # every trainer rank
    groups = pool.generate(prompt_token_ids, SamplingParams(n=4, temperature=1.0, max_tokens=512, seed=step))
    sync.push(model, version=step)                                               # every trainer rank
    sync.close(); pool.shutdown()

Importing this package is light: torch, no transformers, no vllm.
"""
import tulu  # noqa: F401  first: hides torchvision & co. built for another torch (tulu/companions.py)
from rollout.engine import Completion, Engine, SamplingParams, TorchEngine
from rollout.errors import EngineDied, EngineError, EngineTimeout
from rollout.pool import EnginePool
from rollout.receiver import WeightReceiver
from rollout.weight_sync import WeightSync

__all__ = ["Completion", "Engine", "EngineDied", "EngineError", "EnginePool", "EngineTimeout", "SamplingParams",
           "TorchEngine", "WeightReceiver", "WeightSync"]
