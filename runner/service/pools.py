"""The service's warm pool: one `Pool` for the host, shared by every tenant.

Sharing is safe because a pooled sandbox holds nothing of any run or tenant until it
is claimed (runner/run/pool.py): what a run brings (its sockets, environment,
workspace, command) arrives at the claim, and the sandbox is removed after that one
run. What decides whether a run can claim one is its boundary, compiled from the
tenant's floor-merged policy, so tenants whose runs have the same boundary share warm
sandboxes and no tenant can get one made to a boundary wider than its own.

Sizes are the config's (`pools:`): learned from demand, at most `per_boundary` per
boundary, or a fixed size for each listed boundary, warmed from the start; across all
of them at most `max_total` sandboxes are held, which bounds the memory the pool holds
(reported in /metrics as the sum of the warm sandboxes' memory limits).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runner.engines.base import Engine
from runner.run.pool import Pool, Recipe
from runner.service.config import FixedPoolConfig, PoolConfig

log = logging.getLogger("airlock.service")

OWNER_FILE = "pool.owner"  # in runs_dir: the process whose pool this host had last


def settle_previous(runs_dir: Path, engine: Engine) -> list[str]:
    """Remove the unclaimed sandboxes of this host's previous process, if it was killed
    outright (a drain removes them itself), and record this process as the pool's owner.

    Their shims ended with that process (the pool connection is their dead-man switch);
    the stopped containers and their scratch directories are what is left. Only those
    whose owner is the recorded process, and certainly dead, are touched: other pools
    on the same engine are not this host's to judge (`airlock gc` is for them).
    """
    from runner.run.gc import is_scratch, owner_of, remove_scratch
    from runner.run.owner import owner_alive, owner_label

    path = runs_dir / OWNER_FILE
    try:
        previous = path.read_text().strip()
    except OSError:
        previous = ""
    removed: list[str] = []
    if previous and not owner_alive(previous):
        for obj in engine.managed():
            if obj.kind != "container" or not obj.run_id.startswith("pool-"):
                continue
            if obj.owner != previous or owner_of(obj) != previous:
                continue  # another process's (a run that claimed it wrote its own)
            try:
                engine.remove_object(obj)
            except Exception as exc:  # the engine is away: `airlock gc` removes it later
                log.warning("pool: could not remove %s: %s", obj.id[:12], exc)
                continue
            if obj.scratch and is_scratch(Path(obj.scratch)):
                remove_scratch(Path(obj.scratch))
            removed.append(obj.id[:12])
    with contextlib.suppress(OSError):
        path.write_text(owner_label() + "\n")
    return removed


def fixed_recipe(entry: FixedPoolConfig, engine: Engine) -> Recipe:
    """The boundary a run of this entry gets: as the orchestrator compiles it (the
    agent's tmpfs added, its image resolved), so that the run's claim finds it."""
    from runner.agents import get_agent
    from runner.images.custom import run_image
    from runner.run.orchestrator import with_agent_tmpfs

    agent = get_agent(entry.agent)
    if entry.image:
        agent.image = entry.image
    policy = with_agent_tmpfs(entry.policy, agent)
    return Recipe(policy, run_image(policy.image, agent.image, engine), entry.workspace)


def start_pool(config: PoolConfig, engine: Engine) -> Pool:
    """The host's pool; fixed boundaries start warming in the background at once."""
    pool = Pool(engine, max_total=config.max_total, max_per_key=config.per_boundary,
                window=config.window, idle=config.idle,
                on_error=lambda msg: log.warning("%s", msg))

    def add_fixed() -> None:
        # An image named by a policy may need building first: not before the host listens.
        for entry in config.fixed:
            try:
                pool.add(fixed_recipe(entry, engine), entry.size)
            except Exception as exc:
                log.error("pool: %s (%s): cannot be kept warm: %s", entry.policy_ref,
                          entry.agent, exc)

    if config.fixed:
        threading.Thread(target=add_fixed, name="airlock-pool-fixed", daemon=True).start()
    sizing = (", ".join(f"{e.policy_ref}/{e.agent} x{e.size}" for e in config.fixed)
              if config.fixed else f"learned, at most {config.per_boundary} per boundary")
    log.info("warm pool: at most %d sandbox(es); %s", config.max_total, sizing)
    return pool


def collect(pool: Pool | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The pool's numbers for /metrics (nothing when the host has no pool)."""
    if pool is None:
        return
    s = pool.stats()
    yield GaugeMetricFamily("airlock_pool_warm", "Warm sandboxes ready to be claimed.",
                            value=s.ready)
    yield GaugeMetricFamily("airlock_pool_warming", "Sandboxes being started for the pool.",
                            value=s.warming)
    yield GaugeMetricFamily("airlock_pool_boundaries", "Boundaries the pool keeps or learns.",
                            value=s.keys)
    yield GaugeMetricFamily("airlock_pool_max_sandboxes",
                            "Most sandboxes the pool holds at once (config max_total).",
                            value=pool.max_total)
    yield GaugeMetricFamily("airlock_pool_memory_bound_bytes",
                            "Sum of the warm sandboxes' memory limits.", value=s.memory_bound)
    yield CounterMetricFamily("airlock_pool_claims", "Runs that started in a warm sandbox.",
                              value=s.claimed)
    yield CounterMetricFamily("airlock_pool_misses",
                              "Runs that asked the pool and started cold.", value=s.missed)
