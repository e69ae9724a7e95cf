"""Prometheus metrics fed by engine events, named like vLLM's (`vllm:` → `tokenmill:`) so dashboards carry over."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.engine.outputs import FinishedRequestStats, SchedulerStats

# Buckets as in vLLM's v1 Prometheus logger.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)

# Finish reasons that count as a served request; "error" ones are counted by corrupted_requests_total instead.
SUCCESS_REASONS = ("stop", "length", "abort")

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class PrometheusMetrics:
    """An EngineObserver writing into its own CollectorRegistry (one per app, so tests can build several)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def counter(name: str, doc: str, extra_labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra_labels), registry=self.registry)

        m = model_name
        self.time_to_first_token = histogram(
            "tokenmill:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        ).labels(m)
        self.inter_token_latency = histogram(
            "tokenmill:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS
        ).labels(m)
        self.time_per_output_token = histogram(
            "tokenmill:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (same samples as inter_token_latency, vLLM's older name).",
            INTER_TOKEN_BUCKETS,
        ).labels(m)
        self.e2e_request_latency = histogram(
            "tokenmill:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(m)

        self.num_requests_running = gauge("tokenmill:num_requests_running",
                                          "Number of requests in model execution batches.").labels(m)
        self.num_requests_waiting = gauge("tokenmill:num_requests_waiting",
                                          "Number of requests waiting to be processed.").labels(m)
        self.kv_cache_usage = gauge("tokenmill:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
                                    ).labels(m)

        self.prefix_cache_queries = counter("tokenmill:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.").labels(m)
        self.prefix_cache_hits = counter("tokenmill:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.").labels(m)
        self.num_preemptions = counter("tokenmill:num_preemptions",
                                       "Cumulative number of preemptions from the engine.").labels(m)
        self.prompt_tokens = counter("tokenmill:prompt_tokens", "Number of prefill tokens processed.").labels(m)
        self.generation_tokens = counter("tokenmill:generation_tokens",
                                         "Number of generation tokens processed.").labels(m)
        self._request_success = counter("tokenmill:request_success", "Count of successfully processed requests.",
                                        ("finished_reason",))
        for reason in SUCCESS_REASONS:  # expose zeros up front, as vLLM does
            self._request_success.labels(m, reason)
        self.corrupted_requests = counter(
            "tokenmill:corrupted_requests", "Requests that failed because their logits held NaN or inf."
        ).labels(m)

    # EngineObserver -------------------------------------------------------------------------------------------

    def on_step(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.inter_token_latency.observe(itl_s)
        self.time_per_output_token.observe(itl_s)

    def on_finished(self, stats: FinishedRequestStats) -> None:
        self.e2e_request_latency.observe(stats.e2e_latency)
        if stats.corrupted:
            self.corrupted_requests.inc()
        if stats.finish_reason in SUCCESS_REASONS:
            self._request_success.labels(self.model_name, stats.finish_reason).inc()

    # Exposition -----------------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in this registry."""
        return generate_latest(self.registry)
