"""Tensor parallelism: how the Qwen2 decoder is cut across ranks (``plan``) and the collectives
the cut layers call (``group``).

May import: torch, ``ovfast.errors``, ``ovfast.checkpoint``. The runtime starts the processes
(``runtime.tensor_parallel``); the models take a ``ShardPlan`` and a ``TensorParallel`` group.
"""
from __future__ import annotations

from .group import TensorParallel
from .plan import ShardPlan, plan_shards

__all__ = ["ShardPlan", "TensorParallel", "plan_shards"]
