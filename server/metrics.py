"""Prometheus metrics: per-request outcomes recorded by the service, engine state read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scheduler.engine import Engine
from scheduler.request import RequestStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineCollector:
    """Reads the engine's load when Prometheus scrapes, so the engine thread never pays for metrics."""

    def __init__(self, engine_ref) -> None:
        self._engine_ref = engine_ref  # a callable: the engine appears once the models have loaded

    def collect(self):
        engine: Engine | None = self._engine_ref()
        if engine is None:
            return
        load = engine.load()
        for name, doc in (
            ("running", "sequences in the batch"),
            ("waiting", "requests queued for a slot"),
            ("free_slots", "KV-cache slots free"),
            ("reserved_tokens", "tokens (prompt + max_new_tokens) reserved by running sequences"),
        ):
            yield GaugeMetricFamily(f"bild_engine_{name}", doc, value=load[name])
        yield CounterMetricFamily("bild_engine_iterations", "scheduler iterations run", value=engine.iterations)
        yield CounterMetricFamily(
            "bild_engine_busy_seconds", "seconds spent in scheduler iterations", value=engine.busy_seconds
        )
        yield CounterMetricFamily(
            "bild_engine_forward_seconds", "seconds of those spent in model forwards", value=engine.forward_seconds
        )


class Metrics:
    def __init__(self, engine_ref) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine_ref))
        r = self.registry
        self.requests = Counter("bild_requests", "finished requests", ["mode", "outcome"], registry=r)
        self.tokens = Counter(
            "bild_generated_tokens", "emitted tokens by the model that chose them", ["mode", "source"], registry=r
        )
        self.fallbacks = Counter(
            "bild_fallbacks", "times the large model was called to check drafts", ["mode"], registry=r
        )
        self.rollbacks = Counter("bild_rollbacks", "drafts cut by the rollback policy", ["mode"], registry=r)
        self.prefix_lookups = Counter(
            "bild_prefix_cache_lookups",
            "requests matched against the prefix cache: hit (some prompt tokens reused) or miss",
            ["result"],
            registry=r,
        )
        self.prefix_tokens = Counter(
            "bild_prefix_cache_tokens", "prompt tokens: cached (reused) or computed (prefilled)", ["kind"], registry=r
        )
        self.first_token = Histogram(
            "bild_time_to_first_token_seconds",
            "arrival to first settled token",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queued = Histogram(
            "bild_queue_seconds", "arrival to admission into the batch", ["mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.duration = Histogram(
            "bild_request_seconds",
            "whole request, as the service saw it",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observe(self, mode: str, outcome: str, stats: RequestStats | None, seconds: float) -> None:
        self.requests.labels(mode, outcome).inc()
        self.duration.labels(mode).observe(seconds)
        if stats is None:
            return
        self.tokens.labels(mode, "small").inc(stats.small_tokens)
        self.tokens.labels(mode, "large").inc(stats.large_tokens)
        self.fallbacks.labels(mode).inc(stats.fallbacks)
        self.rollbacks.labels(mode).inc(stats.rollbacks)
        self.queued.labels(mode).observe(stats.queue_seconds)
        if stats.prompt_tokens:  # it was admitted (a request refused or cancelled in the queue was not looked up)
            self.prefix_lookups.labels("hit" if stats.cached_prompt_tokens else "miss").inc()
            self.prefix_tokens.labels("cached").inc(stats.cached_prompt_tokens)
            self.prefix_tokens.labels("computed").inc(stats.prompt_tokens - stats.cached_prompt_tokens)
        if stats.generated_tokens:
            self.first_token.labels(mode).observe(stats.first_token_seconds)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
