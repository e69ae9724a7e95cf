"""PrometheusMetrics as an EngineObserver: names, labels, and that events move the numbers."""

from prometheus_client.parser import text_string_to_metric_families

from tokenmill.engine.outputs import FinishedRequestStats, SchedulerStats
from tokenmill.serve.metrics import PrometheusMetrics

EXPECTED = [
    "tokenmill:time_to_first_token_seconds", "tokenmill:inter_token_latency_seconds",
    "tokenmill:time_per_output_token_seconds", "tokenmill:e2e_request_latency_seconds",
    "tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc",
    "tokenmill:prefix_cache_queries", "tokenmill:prefix_cache_hits", "tokenmill:num_preemptions",
    "tokenmill:prompt_tokens", "tokenmill:generation_tokens", "tokenmill:request_success",
    "tokenmill:corrupted_requests",
]


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_metric_is_exposed_with_the_model_label():
    m = PrometheusMetrics("m1")
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    for name in EXPECTED:
        assert name in families, name
    text = m.render().decode()
    assert 'tokenmill:prompt_tokens_total{model_name="m1"} 0.0' in text
    assert 'tokenmill:request_success_total{finished_reason="stop",model_name="m1"} 0.0' in text


def test_events_update_metrics_and_registries_are_independent():
    a, b = PrometheusMetrics("a"), PrometheusMetrics("b")
    a.on_step(SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, prefix_cache_queries=10,
                             prefix_cache_hits=4, num_preemptions=1, num_prompt_tokens=7, num_generation_tokens=3))
    a.on_step(SchedulerStats(num_running=1, num_generation_tokens=1))
    a.on_first_token(0.03)
    a.on_inter_token(0.02)
    a.on_finished(FinishedRequestStats("length", 7, 4, 4, e2e_latency=0.9, ttft=0.03))
    a.on_finished(FinishedRequestStats("error", 7, 1, 0, e2e_latency=0.1, ttft=0.03, corrupted=True))
    s = samples(a)
    lab = (("model_name", "a"),)
    assert s[("tokenmill:num_requests_running", lab)] == 1
    assert s[("tokenmill:num_requests_waiting", lab)] == 0
    assert s[("tokenmill:prefix_cache_queries_total", lab)] == 10
    assert s[("tokenmill:prefix_cache_hits_total", lab)] == 4
    assert s[("tokenmill:num_preemptions_total", lab)] == 1
    assert s[("tokenmill:prompt_tokens_total", lab)] == 7
    assert s[("tokenmill:generation_tokens_total", lab)] == 4
    assert s[("tokenmill:time_to_first_token_seconds_count", lab)] == 1
    assert s[("tokenmill:time_to_first_token_seconds_bucket", (("le", "0.04"), ("model_name", "a")))] == 1
    assert s[("tokenmill:time_to_first_token_seconds_bucket", (("le", "0.02"), ("model_name", "a")))] == 0
    assert s[("tokenmill:inter_token_latency_seconds_count", lab)] == 1
    assert s[("tokenmill:e2e_request_latency_seconds_count", lab)] == 2
    assert s[("tokenmill:request_success_total", (("finished_reason", "length"), ("model_name", "a")))] == 1
    assert s[("tokenmill:corrupted_requests_total", lab)] == 1
    assert samples(b)[("tokenmill:prompt_tokens_total", (("model_name", "b"),))] == 0
