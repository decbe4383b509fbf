"""``provisioner clusters ...`` and ``provisioner usage``: the CLI side of the SDK.

Talks to a running service through ``provisioner.client`` so the CLI and the SDK share one
REST implementation; prints rich tables, and errors as one line (never a traceback).
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Optional

import typer
from dask.utils import format_bytes
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from provisioner.client import ENDING, TERMINAL, ClusterInfo, Provisioner, ProvisionerError

out = Console(soft_wrap=False)
err = Console(stderr=True)

Url = Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer needs Optional)
    "--url", envvar="PROVISIONER_URL", help="service URL [env PROVISIONER_URL]", show_default=False)]
Token = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--token", envvar="PROVISIONER_TOKEN", help="tenant token [env PROVISIONER_TOKEN]",
    show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="print the service's JSON instead of a table")]
ClusterId = Annotated[str, typer.Argument(help="cluster id, e.g. c-1a2b3c4d5e6f")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def service(url: str | None, token: str | None) -> Iterator[Provisioner]:
    """A Provisioner whose errors end the command with the service's message."""
    try:
        prov = Provisioner(url, token)
    except ValueError:
        raise fail("no service URL: pass --url or set PROVISIONER_URL") from None
    try:
        yield prov
    except ProvisionerError as exc:
        raise fail(exc.message) from None
    finally:
        prov.close()


# -- formatting -------------------------------------------------------------------------------


def _age(since: float | None) -> str:
    if since is None:
        return "-"
    seconds = max(0.0, time.time() - since)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _workers(info: ClusterInfo) -> str:
    return f"{info.workers_running}/{info.workers_requested}"


def _adaptive(info: ClusterInfo) -> str:
    return f"{info.adaptive[0]}-{info.adaptive[1]}" if info.adaptive else "-"


def _status(status: str) -> str:
    colour = {"running": "green", "failed": "red", "stopped": "dim", "stopping": "yellow",
              "queued": "yellow"}.get(status)
    return f"[{colour}]{status}[/{colour}]" if colour else status


def clusters_lines(infos: list[ClusterInfo], wide: bool = False) -> list[str]:
    """Plain aligned columns, one cluster a line, never wrapped or coloured (as kubectl
    prints): fits 80 columns, and ``grep``, ``head`` and ``awk`` read it. ``wide`` adds the
    workers' size, the adaptive bounds and the scheduler's address."""
    header = ["ID", "PROJECT", "STATUS", "WORKERS", "AGE"]
    if wide:
        header += ["CORES/W", "MEM/W", "ADAPTIVE", "SCHEDULER"]
    rows = [header]
    for info in infos:
        row = [info.id, info.project, info.status, _workers(info), _age(info.created_at)]
        if wide:
            row += [f"{info.worker_cores:g}", format_bytes(info.worker_memory), _adaptive(info),
                    info.scheduler_address or "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cluster_table(info: ClusterInfo) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows = [
        ("id", info.id), ("tenant", info.tenant), ("project", info.project),
        ("status", _status(info.status)), ("scheduler", info.scheduler_address or "-"),
        ("dashboard", info.dashboard_url or "-"), ("tls", "yes" if info.tls else "no"),
        ("workers", f"{info.workers_running} running of {info.workers_requested} requested"),
        ("worker cores", f"{info.worker_cores:g}"), ("worker memory", format_bytes(info.worker_memory)),
        ("adaptive", _adaptive(info)),
        ("idle timeout", f"{info.idle_timeout:g}s" if info.idle_timeout is not None else "-"),
        ("created", _when(info.created_at)), ("stopped", _when(info.stopped_at)),
        ("stop reason", info.stop_reason or "-"),
        ("waiting", info.why_waiting or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data))


# -- waiting for a cluster --------------------------------------------------------------------


def _ready(info: ClusterInfo) -> bool:
    return info.status == "running" and info.workers_running >= info.workers_requested


def wait_ready(prov: Provisioner, info: ClusterInfo, timeout: float, show: bool = True) -> ClusterInfo:
    """Show status, scheduler and workers n of m live until the cluster is fully up."""
    deadline = time.monotonic() + timeout
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    problem = None
    with Progress(*columns, console=err, disable=not show) as progress:
        task = progress.add_task(f"{info.id}: {info.status}", total=max(info.workers_requested, 1))
        while not _ready(info):
            if info.status in ENDING:
                reason = f" ({info.stop_reason})" if info.stop_reason else ""
                problem = f"cluster {info.id} is {info.status}{reason}"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f"; {info.why_waiting}" if info.why_waiting else ""
                problem = (f"cluster {info.id} not ready after {timeout:g}s (status {info.status}, "
                           f"workers {info.workers_running} of {info.workers_requested}{why}); "
                           f"see: provisioner clusters show {info.id}")
                break
            if info.status == "running":
                time.sleep(min(0.5, remaining))
                info = prov.get_cluster(info.id)
            else:
                info = prov.get_cluster(info.id, wait=min(2.0, remaining))
            stage = (f"scheduler up at {info.scheduler_address}; workers"
                     if info.status == "running" else
                     f"{info.status} ({info.why_waiting})" if info.why_waiting else info.status)
            progress.update(task, description=f"{info.id}: {stage}",
                            total=max(info.workers_requested, 1),
                            completed=info.workers_running if info.status == "running" else 0)
    if problem:
        raise fail(problem)
    return info


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise fail(f"--env {pair!r}: expected KEY=VALUE", 2)
        env[name] = value
    return env


# -- commands ---------------------------------------------------------------------------------

clusters_app = typer.Typer(help="Create, inspect, scale and stop clusters on a running service.",
                           no_args_is_help=True)


@clusters_app.command()
def create(
    url: Url = None,
    token: Token = None,
    project: Annotated[Optional[str], typer.Option(help="project the cluster is billed to")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help="fixed number of workers")] = None,  # noqa: UP045
    worker_cores: Annotated[Optional[float], typer.Option(help="cores per worker")] = None,  # noqa: UP045
    worker_memory: Annotated[Optional[str], typer.Option(help='memory per worker, e.g. "2GiB"')] = None,  # noqa: UP045
    adaptive_min: Annotated[Optional[int], typer.Option(help="adaptive: fewest workers")] = None,  # noqa: UP045
    adaptive_max: Annotated[Optional[int], typer.Option(help="adaptive: most workers")] = None,  # noqa: UP045
    idle_timeout: Annotated[Optional[str], typer.Option(help='stop after this long idle, e.g. "30m"')] = None,  # noqa: UP045
    no_client_timeout: Annotated[Optional[str], typer.Option(help="stop after this long with no client")] = None,  # noqa: UP045
    env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE for workers; repeatable")] = None,  # noqa: UP045
    image: Annotated[Optional[str], typer.Option(help="container image (Mesos backend)")] = None,  # noqa: UP045
    environment: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="a Python environment the service offers (provisioner environments)")] = None,
    wait: Annotated[bool, typer.Option(help="show progress until the scheduler and workers are up")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the cluster id")] = False,
    as_json: AsJson = False,
) -> None:
    """Start a cluster; unset options take the tenant's defaults."""
    if adaptive_min is not None and adaptive_max is None:
        raise fail("--adaptive-min needs --adaptive-max", 2)
    adaptive = {"minimum": adaptive_min or 0, "maximum": adaptive_max} if adaptive_max is not None else None
    options: dict[str, Any] = {"project": project, "workers": workers, "worker_cores": worker_cores,
               "worker_memory": worker_memory, "adaptive": adaptive, "idle_timeout": idle_timeout,
               "no_client_timeout": no_client_timeout, "env": parse_env(env or []) or None,
               "image": image, "environment": environment}
    with service(url, token) as prov:
        info = prov.create_cluster(**options)
        if wait:
            info = wait_ready(prov, info, timeout, show=not quiet)
    if quiet:
        typer.echo(info.id)
    elif as_json:
        _print_json(info.raw)
    else:
        out.print(cluster_table(info))


class Output(enum.StrEnum):
    table = "table"
    wide = "wide"
    json = "json"


@clusters_app.command("list")
def list_(
    url: Url = None,
    token: Token = None,
    status: Annotated[Optional[str], typer.Option(help="only clusters in this status")] = None,  # noqa: UP045
    project: Annotated[Optional[str], typer.Option(help="only this project's clusters")] = None,  # noqa: UP045
    all_: Annotated[bool, typer.Option("--all", "-a", help="stopped and failed ones too")] = False,
    output: Annotated[Output, typer.Option("--output", "-o", help="table, wide or json")] = Output.table,
    as_json: AsJson = False,
) -> None:
    """The tenant's live clusters (all with --all), newest first."""
    with service(url, token) as prov:
        infos = prov.list_clusters(status=status, project=project, include_stopped=all_)
    if as_json or output == Output.json:
        _print_json([i.raw for i in infos])
    elif not infos:
        err.print("no clusters" if all_ or status else "no live clusters (--all shows ended ones)")
    else:
        typer.echo("\n".join(clusters_lines(infos, wide=output == Output.wide)))


@clusters_app.command()
def show(cluster_id: ClusterId, url: Url = None, token: Token = None, as_json: AsJson = False) -> None:
    """One cluster in detail."""
    with service(url, token) as prov:
        info = prov.get_cluster(cluster_id)
    if as_json:
        _print_json(info.raw)
    else:
        out.print(cluster_table(info))


@clusters_app.command()
def events(cluster_id: ClusterId, url: Url = None, token: Token = None,
           as_json: AsJson = False) -> None:
    """What happened to a cluster and why, oldest first."""
    with service(url, token) as prov:
        found = prov.events(cluster_id)
    if as_json:
        _print_json(found)
        return
    for event in found:
        detail = f"  {event['detail']}" if event.get("detail") else ""
        out.print(f"{_when(event['at'])}  {event['kind']}{detail}", highlight=False,
                  markup=False)


@clusters_app.command()
def dashboard(
    cluster_id: ClusterId,
    url: Url = None,
    token: Token = None,
    ttl: Annotated[Optional[float], typer.Option(help="seconds the link stays valid")] = None,  # noqa: UP045
    as_json: AsJson = False,
) -> None:
    """A signed link that opens the cluster's dashboard in a browser, without the token."""
    with service(url, token) as prov:
        link = prov.dashboard_link(cluster_id, ttl)
    if as_json:
        _print_json({"url": link.url, "path_url": link.path_url, "expires_at": link.expires_at})
        return
    typer.echo(link.url)
    err.print(f"valid until {_when(link.expires_at)}; for the JupyterLab Dask extension: "
              f"{link.path_url}", highlight=False, soft_wrap=True)


@clusters_app.command()
def scale(
    cluster_id: ClusterId,
    workers: Annotated[int, typer.Argument(help="number of workers wanted")],
    url: Url = None,
    token: Token = None,
) -> None:
    """Ask for a fixed number of workers (turns adaptivity off)."""
    with service(url, token) as prov:
        info = prov.scale_cluster(cluster_id, workers)
    out.print(f"{info.id}: {_count(info.workers_requested, 'worker')} requested "
              f"({info.workers_running} running)", highlight=False)


@clusters_app.command()
def adapt(
    cluster_id: ClusterId,
    maximum: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--maximum", "--max", help="most workers [default: what the quota allows]")] = None,
    minimum: Annotated[int, typer.Option("--minimum", "--min", help="fewest workers")] = 0,
    url: Url = None,
    token: Token = None,
) -> None:
    """Let the service scale the cluster between --minimum and --maximum workers."""
    with service(url, token) as prov:
        info = prov.adapt_cluster(cluster_id, minimum, maximum)
    out.print(f"{info.id}: adaptive {_adaptive(info)} workers ({info.workers_running} running)",
              highlight=False)


@clusters_app.command()
def delete(
    cluster_ids: Annotated[list[str], typer.Argument(help="one or more cluster ids")],
    url: Url = None,
    token: Token = None,
    wait: Annotated[bool, typer.Option(help="wait until the clusters have stopped")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 120.0,
) -> None:
    """Stop clusters (stopping a stopped cluster is fine)."""
    with service(url, token) as prov:
        for cluster_id in cluster_ids:
            info = prov.stop_cluster(cluster_id)
            deadline = time.monotonic() + timeout
            while wait and info.status not in {"stopped", "failed"} and time.monotonic() < deadline:
                time.sleep(0.5)
                info = prov.get_cluster(cluster_id)
            # Asked to stop but not stopped yet: say so (its status still reads as before).
            shown = "stopping" if info.status not in ENDING else info.status
            reason = f" ({info.stop_reason})" if info.status in TERMINAL and info.stop_reason else ""
            out.print(f"{info.id}: {_status(shown)}{reason}", highlight=False)


# -- usage ------------------------------------------------------------------------------------


def parse_since(text: str) -> float:
    """Epoch seconds from "7d" / "24h" (ago), an ISO date or time, or epoch seconds."""
    from provisioner.sizes import parse_instant

    try:
        return parse_instant(text, time.time())
    except ValueError:
        raise fail(f"--since {text!r}: use a duration (7d, 24h) or a date (2026-01-31)", 2) from None


def _cell(value: Any, key: str = "") -> str:
    if key in {"since", "until"} and isinstance(value, (int, float)):
        return _when(value)
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def usage_tables(data: dict[str, Any]) -> list[Table]:
    """Render whatever per-project shape the service returns: a list or a mapping of rows."""
    tables: list[Table] = []
    projects = data.get("projects")
    rows: list[dict[str, Any]] = []
    if isinstance(projects, dict):
        rows = [{"project": name, **(v if isinstance(v, dict) else {"value": v})}
                for name, v in projects.items()]
    elif isinstance(projects, list):
        rows = [r for r in projects if isinstance(r, dict)]
    summary = {k: v for k, v in data.items() if k != "projects"}
    if summary:
        head = Table(box=None, show_header=False, pad_edge=False)
        head.add_column(style="bold")
        head.add_column()
        for key, value in summary.items():
            head.add_row(key.replace("_", " "), _cell(value, key))
        tables.append(head)
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = Table(header_style="bold", box=None, pad_edge=False)
        for name in columns:
            table.add_column(name.replace("_", " ").upper(), no_wrap=True,
                             justify="left" if name == "project" else "right")
        for row in rows:
            table.add_row(*(_cell(row.get(c, "")) for c in columns))
        tables.append(table)
    return tables


def quota_table(tenant: dict[str, Any]) -> Table:
    """Current usage against the quota, from ``GET /tenants/me``."""
    quota, used = tenant.get("quota") or {}, tenant.get("usage") or {}
    table = Table(header_style="bold", box=None, pad_edge=False,
                  title=f"tenant {tenant.get('name', '?')}: in use now", title_justify="left")
    for name in ("RESOURCE", "IN USE", "QUOTA", "FREE"):
        table.add_column(name, justify="left" if name == "RESOURCE" else "right")
    for key in dict.fromkeys([*quota, *used]):
        limit, now = quota.get(key), used.get(key)
        if isinstance(limit, (dict, list)) or isinstance(now, (dict, list)):
            continue
        show: Callable[[Any], str] = format_bytes if key == "memory" else (lambda v: f"{v:g}")
        free = limit - now if isinstance(limit, (int, float)) and isinstance(now, (int, float)) else None
        table.add_row(key, *(show(v) if isinstance(v, (int, float)) else "-" for v in (now, limit, free)))
    return table


def usage(
    url: Url = None,
    token: Token = None,
    since: Annotated[Optional[str], typer.Option(help="from when: 7d, 24h, or a date")] = None,  # noqa: UP045
    as_json: AsJson = False,
) -> None:
    """Resources used per project (core-seconds, memory GiB-seconds)."""
    start = parse_since(since) if since else None
    with service(url, token) as prov:
        try:
            data: Any = prov.usage(since=start)
            fallback = False
        except ProvisionerError as exc:
            if exc.status_code != 404:
                raise
            data, fallback = prov.tenant(), True
    if as_json:
        _print_json(data)
    elif fallback:
        err.print("usage history is not served by this service; showing current usage", style="yellow")
        out.print(quota_table(data))
    else:
        for table in usage_tables(data if isinstance(data, dict) else {"projects": data}):
            out.print(table)


def environments(url: Url = None, token: Token = None, as_json: AsJson = False) -> None:
    """The Python environments your clusters may run, and what differs from this client's."""
    from provisioner.versions import differences, installed_versions

    with service(url, token) as prov:
        data = prov.environments()
    if as_json:
        _print_json(data)
        return
    here = installed_versions()
    rows = [("(default)", data.get("default") or {}),
            *((e["name"], e.get("versions") or {}) for e in data.get("environments", []))]
    for name, versions in rows:
        found = differences(here, versions) if versions else ["versions unknown here"]
        typer.echo(f"{name}: python {versions.get('python', '?')}, dask {versions.get('dask', '?')}"
                   f" ({'; '.join(found) if found else 'same as this client'})")


def register(app: typer.Typer) -> None:
    """Add ``clusters``, ``environments`` and ``usage`` to the ``provisioner`` command."""
    app.add_typer(clusters_app, name="clusters")
    app.command("usage")(usage)
    app.command("environments")(environments)
