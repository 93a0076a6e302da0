"""The engine's Prometheus metrics (prometheus-client), in a registry of their own that GET /metrics renders."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """Requests by finish reason, queue depth, active slots, token counts, TTFT and inter-token latency; in paged mode
    also the prefix cache's looked-up and hit tokens and the KV pages used and in all."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mistral_jax_requests", "Requests finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.queue_depth = Gauge("mistral_jax_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.active_slots = Gauge("mistral_jax_active_slots", "Decode slots held by a request", registry=r)
        self.prompt_tokens = Counter("mistral_jax_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("mistral_jax_generation_tokens", "Tokens generated", registry=r)
        self.accepted_draft_tokens = Counter("mistral_jax_accepted_draft_tokens",
                                             "Drafted tokens the model kept (speculative decoding)", registry=r)
        self.prefix_cache_queries_tokens = Counter("mistral_jax_prefix_cache_queries_tokens",
                                                   "Prompt tokens looked up in the prefix cache (paged mode)",
                                                   registry=r)
        self.prefix_cache_hits_tokens = Counter("mistral_jax_prefix_cache_hits_tokens",
                                                "Prompt tokens found in the prefix cache (paged mode)", registry=r)
        self.kv_pages_used = Gauge("mistral_jax_kv_pages_used", "KV cache pages held by requests (paged mode)",
                                   registry=r)
        self.kv_pages_total = Gauge("mistral_jax_kv_pages_total", "KV cache pages in the pool (paged mode)",
                                    registry=r)
        self.time_to_first_token = Histogram("mistral_jax_time_to_first_token_seconds",
                                             "From submission to the first generated token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("mistral_jax_inter_token_latency_seconds",
                                             "Between two tokens of one request", buckets=_LATENCY_BUCKETS,
                                             registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
