"""`/metrics`: every usage number per tenant, in Prometheus' text format.

Usage totals and queue depths are read from the store at scrape time (so every host
answers the same, and a restart loses nothing); what only this process sees (requests
refused by quota or floor, this host's running runs) is counted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runner.service.pools import collect as pool_metrics
from runner.service.store.base import PEAK_PREFIX

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from runner.service.config import Config
    from runner.service.dispatch import Dispatcher
    from runner.service.store import Store

# Usage counters as the store keeps them -> (metric name, help).
USAGE = {
    "runs": ("airlock_tenant_runs_total", "Runs that ended."),
    "wall_seconds": ("airlock_tenant_wall_seconds_total", "Wall time of runs, seconds."),
    "cpu_seconds": ("airlock_tenant_cpu_seconds_total",
                    "CPU time of sandboxes (the engine's stats), seconds."),
    "provider_requests": ("airlock_tenant_provider_requests_total",
                          "Requests through the provider gateway."),
    "tokens": ("airlock_tenant_tokens_total", "Input plus output tokens counted by the gateway."),
    "input_tokens": ("airlock_tenant_input_tokens_total", "Input tokens counted by the gateway."),
    "output_tokens": ("airlock_tenant_output_tokens_total",
                      "Output tokens counted by the gateway."),
    "mcp_calls": ("airlock_tenant_mcp_calls_total", "MCP tool calls."),
    "egress_bytes": ("airlock_tenant_egress_bytes_total", "Bytes through the egress proxy."),
    "provider_bytes": ("airlock_tenant_provider_bytes_total",
                       "Bytes through the provider gateway."),
    "output_bytes": ("airlock_tenant_output_bytes_total", "Agent stdout and stderr bytes."),
    "cost_usd": ("airlock_tenant_cost_usd_total",
                 "Provider cost in USD, from the prices in the tenant's policy (provider.prices)."),
}


class UsageCollector(Collector):
    def __init__(self, config: Config, store: Store, dispatcher: Dispatcher) -> None:
        self.config = config
        self.store = store
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        families = {k: CounterMetricFamily(name.removesuffix("_total"), help_, labels=["tenant"])
                    for k, (name, help_) in USAGE.items()}
        peak = GaugeMetricFamily("airlock_tenant_peak_memory_bytes",
                                 "Highest memory of any sandbox of the tenant today (engine stats).",
                                 labels=["tenant"])
        other = GaugeMetricFamily("airlock_tenant_usage", "Other usage counters, by name.",
                                  labels=["tenant", "counter"])
        from datetime import UTC, datetime

        today = datetime.now(UTC).date()
        for tenant in self.config.tenants:
            for key, value in self.store.usage(tenant).items():
                if key in families:
                    families[key].add_metric([tenant], value)
                elif not key.startswith(PEAK_PREFIX):
                    other.add_metric([tenant, key], value)
            peak.add_metric([tenant], self.store.usage(tenant, since=today)
                            .get("peak_memory_bytes", 0.0))
        yield from families.values()
        yield peak
        yield other
        active = GaugeMetricFamily("airlock_tenant_runs", "Runs queued or running now (all hosts).",
                                   labels=["tenant", "state"])
        counts = self.store.counts()
        for tenant in self.config.tenants:
            c = counts.get(tenant, {})
            for state in ("queued", "running"):
                active.add_metric([tenant, state], c.get(state, 0))
        yield active
        yield GaugeMetricFamily("airlock_host_runs", "Runs this host is running.",
                                value=self.dispatcher.running)
        yield GaugeMetricFamily("airlock_host_capacity_runs", "Runs this host runs at once.",
                                value=self.dispatcher.capacity)
        yield from pool_metrics(self.dispatcher.pool)


class Metrics:
    def __init__(self, config: Config, store: Store, dispatcher: Dispatcher) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(UsageCollector(config, store, dispatcher))
        self.refused = Counter("airlock_tenant_refused", "Run requests refused, by reason.",
                               ["tenant", "reason"], registry=self.registry)
        self.created = Counter("airlock_tenant_runs_created", "Runs queued.", ["tenant"],
                               registry=self.registry)
        self.draining = Gauge("airlock_host_draining", "1 while this host drains.",
                              registry=self.registry)
