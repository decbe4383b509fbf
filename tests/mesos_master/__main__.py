"""CLI: `python -m tests.mesos_master --port 5050 --agents 2 --agent-cpus 4 --agent-mem 8192`.

Prints the master's URL on its own line once it is listening, then serves until SIGTERM or
SIGINT, on which it ends all streams and kills every task process before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .model import AgentSpec
from .server import MesosMaster


def parse_ports(text: str) -> tuple[int, int]:
    begin, _, end = text.partition("-")
    return int(begin), int(end or begin)


def split_ports(ports: tuple[int, int] | None, agents: int) -> list[tuple[int, int] | None]:
    """All agents run on this one machine: give each its own slice of the range."""
    if ports is None or agents <= 1:
        return [ports] * agents
    begin, end = ports
    size = (end - begin + 1) // agents
    if size < 1:
        raise SystemExit(f"--agent-ports {begin}-{end} is too small for {agents} agents")
    return [(begin + i * size, begin + (i + 1) * size - 1) for i in range(agents)]


def parse_quota(text: str) -> tuple[str, dict[str, float]]:
    """`tenant-a:cpus=4,mem=8192`"""
    role, _, spec = text.partition(":")
    limits = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        limits[key.strip()] = float(value)
    if not role or not limits:
        raise argparse.ArgumentTypeError(f"bad quota {text!r}; expected ROLE:cpus=N,mem=MB")
    return role, limits


def parse_weight(text: str) -> tuple[str, float]:
    role, _, weight = text.partition("=")
    return role, float(weight)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.mesos_master", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5050, help="0 picks a free port")
    p.add_argument("--agents", type=int, default=1)
    p.add_argument("--agent-cpus", type=float, default=4.0)
    p.add_argument("--agent-mem", type=float, default=8192.0, help="MB")
    p.add_argument("--agent-disk", type=float, default=10240.0, help="MB")
    p.add_argument(
        "--agent-ports",
        type=parse_ports,
        default=None,
        help="BEGIN-END, shared out among the agents so no two offer the same port (default: 31000+1000*i)",
    )
    p.add_argument("--no-processes", action="store_true", help="tasks run no process (benchmarks)")
    p.add_argument("--heartbeat", type=float, default=15.0, help="heartbeat interval, seconds")
    p.add_argument("--allocation-interval", type=float, default=1.0)
    p.add_argument("--retry-interval", type=float, default=10.0, help="first status update retry, seconds")
    p.add_argument("--retry-max", type=float, default=600.0, help="cap of the status update retry backoff")
    p.add_argument("--chunk-size", type=int, default=None, help="split stream records into chunks this big")
    p.add_argument("--quota", type=parse_quota, action="append", default=[], help="ROLE:cpus=N,mem=MB")
    p.add_argument("--weight", type=parse_weight, action="append", default=[], help="ROLE=W")
    p.add_argument("--roles", default=None, help="comma-separated role whitelist (like --roles)")
    p.add_argument(
        "--credential", action="append", default=[], help="PRINCIPAL:SECRET; enables HTTP Basic authentication"
    )
    p.add_argument("--redirect-to", default=None, help="act as non-leader, redirecting to HOST:PORT")
    p.add_argument(
        "--work-dir",
        default=os.environ.get("MESOS_MASTER_WORK_DIR"),
        help="where sandboxes go and stay (default: $MESOS_MASTER_WORK_DIR, else a temp dir removed on exit)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--offer-timeout", type=float, default=None, help="rescind offers older than this, seconds")
    p.add_argument("--log-level", default="WARNING")
    return p


async def serve(args: argparse.Namespace) -> None:
    agents = [
        AgentSpec(cpus=args.agent_cpus, mem=args.agent_mem, disk=args.agent_disk, ports=ports)
        for ports in split_ports(args.agent_ports, args.agents)
    ]
    master = MesosMaster(
        agents,
        host=args.host,
        port=args.port,
        heartbeat_interval=args.heartbeat,
        allocation_interval=args.allocation_interval,
        update_retry_interval=args.retry_interval,
        update_retry_max=args.retry_max,
        credentials=dict(c.split(":", 1) for c in args.credential) or None,
        run_processes=not args.no_processes,
        chunk_size=args.chunk_size,
        quotas=dict(args.quota),
        weights=dict(args.weight),
        allowed_roles=set(args.roles.split(",")) if args.roles else None,
        redirect_to=args.redirect_to,
        work_dir=args.work_dir,
        seed=args.seed,
        offer_timeout=args.offer_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with master:
        print(master.url, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
