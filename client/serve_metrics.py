"""What the operator of a `potluck serve` gateway watches: Prometheus metrics at ``GET /metrics``
(behind ``--api-key`` like every path), read from the batching loop when scraped. Each of a
request's ``n`` choices is a request of the loop, and counts as one here."""
from __future__ import annotations

from typing import Iterator

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .serving import TextGenerator

COUNTERS = {  # decode loop counter -> (metric name, help)
    "tokens": ("potluck_serve_tokens_generated", "Tokens generated for all requests"),
    "prompt_tokens": ("potluck_serve_prompt_tokens", "Prompt tokens of the requests that started generating"),
    "rounds": ("potluck_serve_rounds", "Rounds sent to the swarm (every active request's next step together)"),
    "round_rows": ("potluck_serve_round_rows", "Requests' steps sent in rounds (rows / rounds = mean round size)"),
}
OUTCOMES = ("answered", "failed", "left")  # ended by its end of text, limit or stop string; an error; its client


class ServeCollector(Collector):
    def __init__(self, generator: TextGenerator):
        self.generator = generator

    def collect(self) -> Iterator[Metric]:
        loop = self.generator.loop
        info = InfoMetricFamily("potluck_serve", "What this gateway serves")
        info.add_metric([], {"model": self.generator.name, "max_active": str(loop.max_active)})
        yield info
        yield GaugeMetricFamily("potluck_serve_requests_active", "Requests generating now (at most --max-active)",
                                value=loop.active())
        yield GaugeMetricFamily("potluck_serve_requests_waiting", "Requests waiting for a place among the active",
                                value=loop.waiting())
        counters = dict(loop.counters)
        for key, (name, help_text) in COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=counters.get(key, 0))
        ended = CounterMetricFamily("potluck_serve_requests_ended", "Requests that left the batching loop, by how",
                                    labels=["outcome"])
        for outcome in OUTCOMES:
            ended.add_metric([outcome], counters.get(f"requests_{outcome}", 0))
        yield ended


class ServeMetrics:
    """The gateway's metrics page."""

    def __init__(self, generator: TextGenerator):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ServeCollector(generator))

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
