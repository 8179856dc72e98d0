"""Prometheus metrics of one server (its own registry, so several apps in one process never clash)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..runtime.generation import Completion

_LATENCY_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


class Metrics:
    def __init__(self, stats=None):
        """``stats``: a callable giving ``Engine.stats()`` (None while the model loads)."""
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self._stats = stats
        self.running = Gauge("ovfast_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("ovfast_requests_waiting", "Requests accepted and not yet running", registry=r)
        self.kv_usage = Gauge("ovfast_kv_cache_usage", "Fraction of KV-cache positions in use", registry=r)
        self.requests = Counter("ovfast_requests", "Finished requests by HTTP status and finish reason",
                                ["status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("ovfast_prompt_tokens", "Prompt tokens (media included) of answered requests",
                                     registry=r)
        self.generation_tokens = Counter("ovfast_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("ovfast_time_to_first_token_seconds", "Submission to first token", buckets=_LATENCY_S,
                              registry=r)
        self.itl = Histogram("ovfast_inter_token_latency_seconds", "Mean gap between a request's later tokens",
                             buckets=_LATENCY_S, registry=r)
        self.preprocess = Histogram("ovfast_preprocess_seconds", "Media decoding, tiling and tokenising",
                                    buckets=_LATENCY_S, registry=r)
        self.vision = Histogram("ovfast_vision_seconds", "Vision tower and projector", buckets=_LATENCY_S, registry=r)
        # Cache figures are the engine's own running totals, read at each scrape.
        self.kv_blocks_used = Gauge("ovfast_kv_cache_blocks_used", "KV-cache pages in use", registry=r)
        self.kv_blocks_total = Gauge("ovfast_kv_cache_blocks_total", "KV-cache pages in all", registry=r)
        self.prefix_hits = Gauge("ovfast_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache so far",
                                 registry=r)
        self.prefix_queries = Gauge("ovfast_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache "
                                    "so far", registry=r)
        self.encoder_hits = Gauge("ovfast_encoder_cache_hits", "Media items served from the vision cache so far",
                                  registry=r)
        self.encoder_misses = Gauge("ovfast_encoder_cache_misses", "Media items the vision tower encoded so far",
                                    registry=r)
        self.preemptions = Gauge("ovfast_preemptions", "Sequences preempted for KV pages so far", registry=r)

    def observe(self, status: int, c: Completion | None) -> None:
        self.requests.labels(str(status), c.finish_reason if c is not None else "error").inc()
        if c is None:
            return
        t = c.timings
        self.prompt_tokens.inc(c.prompt_tokens)
        self.generation_tokens.inc(len(c.token_ids))
        if c.token_ids:
            self.ttft.observe(t.time_to_first_token_ms / 1e3)
            self.preprocess.observe(t.preprocess_ms / 1e3)
            if t.vision_ms:
                self.vision.observe(t.vision_ms / 1e3)
        if t.decode_tokens:
            self.itl.observe(t.decode_ms / t.decode_tokens / 1e3)

    def render(self) -> bytes:
        if self._stats is not None:
            s = self._stats()
            self.running.set(s["running"])
            self.waiting.set(s["waiting"])
            self.kv_usage.set(s["kv_tokens_used"] / max(s["kv_tokens_total"], 1))
            self.kv_blocks_used.set(s["kv_blocks_used"])
            self.kv_blocks_total.set(s["kv_blocks_total"])
            self.prefix_hits.set(s["prefix_cache_hit_tokens"])
            self.prefix_queries.set(s["prefix_cache_query_tokens"])
            self.encoder_hits.set(s["encoder_cache_hits"])
            self.encoder_misses.set(s["encoder_cache_misses"])
            self.preemptions.set(s["preemptions"])
        return generate_latest(self.registry)
