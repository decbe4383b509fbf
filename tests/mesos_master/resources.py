"""Resource arithmetic for the test master.

Mesos resources are a list of JSON objects (SCALAR / RANGES / SET).  The double only
needs unreserved resources, so a bundle is kept as two maps: scalar name -> amount and
range name -> sorted disjoint inclusive intervals.  Scalars are rounded to three
decimals, exactly like Mesos does, so repeated add/subtract never drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Interval = tuple[int, int]

# The allocator only offers a bundle that holds at least one of these.
MIN_ALLOCATABLE = {"cpus": 0.01, "mem": 32.0}


def _round(value: float) -> float:
    return round(value + 0.0, 3)


def _normalize(intervals: list[Interval]) -> list[Interval]:
    """Sort and merge overlapping or adjacent inclusive intervals."""
    out: list[Interval] = []
    for begin, end in sorted(intervals):
        if begin > end:
            continue
        if out and begin <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def _subtract_intervals(have: list[Interval], take: list[Interval]) -> list[Interval]:
    result = list(have)
    for tb, te in take:
        nxt: list[Interval] = []
        for b, e in result:
            if te < b or tb > e:
                nxt.append((b, e))
                continue
            if b < tb:
                nxt.append((b, tb - 1))
            if te < e:
                nxt.append((te + 1, e))
        result = nxt
    return _normalize(result)


def _contains_intervals(have: list[Interval], want: list[Interval]) -> bool:
    return all(any(b <= wb and we <= e for b, e in have) for wb, we in want)


class ResourceError(ValueError):
    """A resource JSON object the double cannot interpret."""


@dataclass
class Resources:
    """An unreserved resource bundle (what an agent has, an offer holds, a task uses)."""

    scalars: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, list[Interval]] = field(default_factory=dict)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> Resources:
        """Parse a Mesos `repeated Resource` JSON list (raises ResourceError)."""
        res = cls()
        for item in items:
            name = item.get("name")
            kind = item.get("type")
            if not isinstance(name, str) or not name:
                raise ResourceError("Resource without a name")
            if kind == "SCALAR":
                value = (item.get("scalar") or {}).get("value")
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ResourceError(f"Scalar resource '{name}' without a value")
                if value < 0:
                    raise ResourceError(f"Negative scalar resource '{name}'")
                res.scalars[name] = _round(res.scalars.get(name, 0.0) + float(value))
            elif kind == "RANGES":
                raw = (item.get("ranges") or {}).get("range") or []
                intervals = []
                for r in raw:
                    b, e = r.get("begin"), r.get("end")
                    if not isinstance(b, int) or not isinstance(e, int) or b > e:
                        raise ResourceError(f"Invalid range in resource '{name}'")
                    intervals.append((b, e))
                res.ranges[name] = _normalize(res.ranges.get(name, []) + intervals)
            else:
                raise ResourceError(f"Unsupported resource type {kind!r} for '{name}'")
        return res.pruned()

    def copy(self) -> Resources:
        return Resources(dict(self.scalars), {k: list(v) for k, v in self.ranges.items()})

    def pruned(self) -> Resources:
        """Drop zero scalars and empty ranges."""
        self.scalars = {k: v for k, v in self.scalars.items() if v > 0}
        self.ranges = {k: v for k, v in self.ranges.items() if v}
        return self

    # ----------------------------------------------------------------- arithmetic
    def __add__(self, other: Resources) -> Resources:
        out = self.copy()
        for k, v in other.scalars.items():
            out.scalars[k] = _round(out.scalars.get(k, 0.0) + v)
        for k, v in other.ranges.items():
            out.ranges[k] = _normalize(out.ranges.get(k, []) + v)
        return out.pruned()

    def __sub__(self, other: Resources) -> Resources:
        out = self.copy()
        for k, v in other.scalars.items():
            out.scalars[k] = max(0.0, _round(out.scalars.get(k, 0.0) - v))
        for k, v in other.ranges.items():
            out.ranges[k] = _subtract_intervals(out.ranges.get(k, []), v)
        return out.pruned()

    def contains(self, other: Resources) -> bool:
        """True when `other` fits entirely inside this bundle."""
        for k, v in other.scalars.items():
            if _round(self.scalars.get(k, 0.0) - v) < 0:
                return False
        for k, v in other.ranges.items():
            if not _contains_intervals(self.ranges.get(k, []), v):
                return False
        return True

    def is_empty(self) -> bool:
        return not self.scalars and not self.ranges

    def allocatable(self) -> bool:
        """Meets Mesos's default minimum allocatable amount (cpus:0.01 | mem:32)."""
        return any(self.scalars.get(k, 0.0) >= v for k, v in MIN_ALLOCATABLE.items())

    def scalar(self, name: str) -> float:
        return self.scalars.get(name, 0.0)

    # ----------------------------------------------------------------- output
    def to_json(self, allocation_role: str | None = None) -> list[dict[str, Any]]:
        """Mesos JSON for this bundle; `allocation_role` adds allocation_info (MULTI_ROLE)."""
        items: list[dict[str, Any]] = []
        for name in sorted(self.scalars):
            items.append({"name": name, "type": "SCALAR", "scalar": {"value": self.scalars[name]}})
        for name in sorted(self.ranges):
            rng = [{"begin": b, "end": e} for b, e in self.ranges[name]]
            items.append({"name": name, "type": "RANGES", "ranges": {"range": rng}})
        for item in items:
            item["role"] = "*"
            if allocation_role is not None:
                item["allocation_info"] = {"role": allocation_role}
        return items

    def summary(self) -> str:
        parts = [f"{k}:{v:g}" for k, v in sorted(self.scalars.items())]
        parts += [f"{k}:[" + ",".join(f"{b}-{e}" for b, e in v) + "]" for k, v in sorted(self.ranges.items())]
        return "; ".join(parts) or "{}"


def agent_resources(cpus: float, mem: float, disk: float, ports: list[Interval] | None) -> Resources:
    """The total resources of a simulated agent."""
    res = Resources({"cpus": float(cpus), "mem": float(mem), "disk": float(disk)})
    if ports:
        res.ranges["ports"] = _normalize(list(ports))
    return res.pruned()
