"""HTTP endpoints of the test master: the scheduler API with Mesos's exact status codes,
/version, a few operator calls, /roles and /state, and fault hooks under /test/.

The order of the checks in `scheduler()` is the order of Mesos's own handler
(src/master/http.cpp), because clients see different codes when several things are wrong.
"""

from __future__ import annotations

import base64
import json
import signal
from typing import Any

from .httpserver import Request, Response, StreamResponse
from .master import VERSION, Master
from .model import AgentSpec
from .protocol import ConversionError, ValidationError, convert, validate_call
from .resources import Resources

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


def media_type(value: str | None) -> str | None:
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower()


def accepts(request: Request, wanted: tuple[str, ...] = (JSON, PROTOBUF)) -> bool:
    """HTTP Accept matching (no header = anything goes; q=0 excludes)."""
    header = request.header("accept")
    if header is None or not header.strip():
        return True
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        q = 1.0
        for param in parts[1:]:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        for want in wanted:
            major = want.split("/")[0]
            if mtype in ("*/*", f"{major}/*", want):
                return True
    return False


class MasterAPI:
    """Routes requests to the master; one instance per server."""

    def __init__(self, master: Master, credentials: dict[str, str] | None = None) -> None:
        self.master = master
        self.credentials = credentials

    def authenticated(self, request: Request) -> bool:
        """HTTP Basic framework authentication, when the master was given credentials."""
        if not self.credentials:
            return True
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            principal, _, secret = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return self.credentials.get(principal) == secret

    async def __call__(self, request: Request) -> Response | StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in ("/api/v1/scheduler", "/master/api/v1/scheduler"):
            if not self.authenticated(request):
                return Response.text(401, "Unauthorized", WWW_Authenticate='Basic realm="mesos"')
            return self.scheduler(request)
        if path in ("/version", "/master/version"):
            return self.version()
        if path in ("/api/v1", "/master/api/v1"):
            return self.operator(request)
        if path in ("/roles", "/master/roles", "/roles.json"):
            return Response.json(200, {"roles": self.master.roles_json()})
        if path in ("/state", "/master/state", "/state.json"):
            return Response.json(200, self.master.state())
        if path == "/health":
            return Response(200)
        if path.startswith("/test/"):
            return self.test_hook(request, path[len("/test/") :])
        return Response.text(404, "Not found")

    # ------------------------------------------------------------------ scheduler API
    def scheduler(self, request: Request) -> Response | StreamResponse:
        master = self.master
        if not master.leading:
            if master.redirect_to:
                location = f"//{master.redirect_to}/api/v1/scheduler"
                return Response.text(307, "", Location=location)
            return Response.text(503, "No leader elected")
        if request.method != "POST":
            return Response.text(405, f"Expecting one of {{ 'POST' }}, but received '{request.method}'", Allow="POST")
        ctype = media_type(request.header("content-type"))
        if ctype is None:
            return Response.text(400, "Expecting 'Content-Type' to be present")
        if ctype == PROTOBUF:
            return Response.text(415, "This test master only speaks application/json")
        if ctype != JSON:
            return Response.text(415, f"Expecting 'Content-Type' of {JSON} or {PROTOBUF}")
        try:
            raw = json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return Response.text(400, f"Failed to parse body into JSON: {exc}")
        try:
            call = convert("Call", raw)
        except ConversionError as exc:
            return Response.text(400, f"Failed to convert JSON into Call protobuf: {exc}")
        try:
            validate_call(call)
        except (ValidationError, ConversionError) as exc:
            return Response.text(400, f"Failed to validate scheduler::Call: {exc}")

        ctype_call = call["type"]
        if ctype_call == "SUBSCRIBE":
            if not accepts(request):
                return Response.text(406, f"Expecting 'Accept' to allow '{JSON}' or '{PROTOBUF}'")
            if not accepts(request, (JSON,)):  # a real master would stream protobuf here
                return Response.text(406, "This test master only streams application/json")
            if request.header("mesos-stream-id") is not None:
                return Response.text(400, "Subscribe calls should not include the 'Mesos-Stream-Id' header")
            return master.subscribe(call).response()
        if ctype_call == "RECONCILE_OPERATIONS" and not accepts(request):
            return Response.text(406, f"Expecting 'Accept' to allow '{JSON}' or '{PROTOBUF}'")

        fw_id = call["framework_id"]["value"]
        fw = master.frameworks.get(fw_id)
        if fw is None:
            return Response.text(400, "Framework cannot be found")
        if not fw.connected:
            return Response.text(403, "Framework is not subscribed")
        stream_id = request.header("mesos-stream-id")
        if stream_id is None:
            return Response.text(400, "All non-subscribe calls should include the 'Mesos-Stream-Id' header")
        assert fw.subscription is not None
        if stream_id != fw.subscription.stream_id:
            return Response.text(
                400,
                f"The stream ID '{stream_id}' included in this request didn't match the stream ID "
                f"currently associated with framework ID {fw_id}",
            )
        return self.dispatch(fw_id, call)

    def dispatch(self, fw_id: str, call: dict[str, Any]) -> Response:
        master = self.master
        fw = master.frameworks[fw_id]
        kind = call["type"]
        if kind == "TEARDOWN":
            master.remove_framework(fw)
        elif kind == "ACCEPT":
            master.accept(fw, call["accept"])
        elif kind == "DECLINE":
            master.decline(fw, call["decline"])
        elif kind == "REVIVE":
            master.revive(fw, (call.get("revive") or {}).get("roles") or [])
        elif kind == "SUPPRESS":
            master.suppress(fw, (call.get("suppress") or {}).get("roles") or [])
        elif kind == "KILL":
            master.kill(fw, call["kill"])
        elif kind == "ACKNOWLEDGE":
            master.acknowledge(fw, call["acknowledge"])
        elif kind == "RECONCILE":
            master.reconcile(fw, call["reconcile"].get("tasks") or [])
        elif kind == "UPDATE_FRAMEWORK":
            error = master.update_framework(fw, call["update_framework"])
            return Response.text(400, error) if error else Response(200)
        elif kind == "UNKNOWN":
            return Response.text(501, "Unknown call type")
        # SHUTDOWN, MESSAGE, REQUEST, inverse offers, operation acks/reconciliation:
        # accepted and ignored (no custom executors, no maintenance, no operations).
        return Response(202)

    # ------------------------------------------------------------------ others
    def version(self) -> Response:
        return Response.json(
            200,
            {
                "version": VERSION,
                "build_date": "2020-11-24 00:00:00",
                "build_time": 1606176000.0,
                "build_user": "test-double",
                "git_sha": "0" * 40,
                "git_tag": VERSION,
            },
        )

    def operator(self, request: Request) -> Response:
        """Operator API subset: GET_VERSION, GET_QUOTA, UPDATE_QUOTA, GET_ROLES, GET_STATE."""
        if request.method != "POST":
            return Response.text(405, "Expecting 'POST'", Allow="POST")
        if media_type(request.header("content-type")) != JSON:
            return Response.text(415, f"Expecting 'Content-Type' of {JSON}")
        try:
            call = json.loads(request.body)
        except ValueError as exc:
            return Response.text(400, f"Failed to parse body into JSON: {exc}")
        kind = call.get("type") if isinstance(call, dict) else None
        master = self.master
        if kind == "GET_VERSION":
            info = json.loads(self.version().body)
            return Response.json(200, {"type": "GET_VERSION", "get_version": {"version_info": info}})
        if kind == "GET_QUOTA":
            configs, infos = [], []
            for name, role in sorted(master.roles.items()):
                if role.limits:
                    limits = {k: {"value": v} for k, v in role.limits.scalars.items()}
                    configs.append({"role": name, "limits": limits})
                    infos.append({"role": name, "limit": Resources(dict(role.limits.scalars)).to_json()})
            status = {"infos": infos, "configs": configs}
            return Response.json(200, {"type": "GET_QUOTA", "get_quota": {"status": status}})
        if kind == "UPDATE_QUOTA":
            return self.update_quota(call.get("update_quota") or {})
        if kind == "GET_ROLES":
            roles = [
                {"name": r["name"], "weight": r["weight"], "frameworks": [{"value": f} for f in r["frameworks"]]}
                for r in master.roles_json()
            ]
            return Response.json(200, {"type": "GET_ROLES", "get_roles": {"roles": roles}})
        if kind == "GET_STATE":
            return Response.json(200, {"type": "GET_STATE", "get_state": master.state()})
        return Response.text(501, f"Operator call {kind!r} is not implemented by the test master")

    def update_quota(self, body: dict[str, Any]) -> Response:
        master = self.master
        configs = body.get("quota_configs") or []
        parsed: list[tuple[str, dict[str, float]]] = []
        for cfg in configs:
            role = cfg.get("role")
            if not isinstance(role, str) or not role or "/" in role:
                return Response.text(400, f"Invalid quota role {role!r}")
            try:
                limits = {k: float(v["value"]) for k, v in (cfg.get("limits") or {}).items()}
            except (TypeError, KeyError, ValueError):
                return Response.text(400, "Invalid quota limits")
            parsed.append((role, limits))
        if not body.get("force"):
            allocated: dict[str, Resources] = {}
            for fw in master.frameworks.values():
                for task in fw.tasks.values():
                    if not task.released:
                        top = task.role.split("/")[0]
                        allocated[top] = allocated.get(top, Resources()) + task.resources
            for role, limits in parsed:
                used = allocated.get(role, Resources())
                for name, limit in limits.items():
                    if used.scalar(name) > limit:
                        return Response.text(
                            400,
                            f"Invalid QuotaConfig: role '{role}' is already consuming "
                            f"{used.scalar(name)} {name}, more than the requested limit {limit}",
                        )
        for role, limits in parsed:
            master.set_quota(role, limits)
        return Response(200)

    # ------------------------------------------------------------------ fault hooks
    def test_hook(self, request: Request, name: str) -> Response:
        """Fault hooks for tests that run the master in another process."""
        if request.method != "POST":
            return Response.text(405, "Expecting 'POST'", Allow="POST")
        try:
            args = json.loads(request.body or b"{}")
        except ValueError as exc:
            return Response.text(400, str(exc))
        master = self.master
        try:
            if name == "drop_framework_stream":
                master.drop_stream(args["framework_id"])
            elif name == "remove_agent":
                master.remove_agent(args["agent_id"], args.get("reason", "REASON_AGENT_REMOVED"))
            elif name == "add_agent":
                ports = args.get("ports")
                spec = AgentSpec(
                    cpus=args.get("cpus", 4.0),
                    mem=args.get("mem", 8192.0),
                    disk=args.get("disk", 10240.0),
                    ports=[tuple(p) for p in ports] if ports else None,
                    hostname=args.get("hostname", "127.0.0.1"),
                )
                return Response.json(200, {"agent_id": master.add_agent(spec)})
            elif name == "kill_task_process":
                sig = getattr(signal, args.get("signal", "SIGKILL"))
                master.kill_task_process(args["task_id"], args.get("framework_id"), sig)
            elif name == "set_quota":
                master.set_quota(args["role"], args.get("limits"))
            elif name == "fail_over":
                master.fail_over()
            elif name == "rescind_offer":
                master.rescind_offer(args["offer_id"])
            elif name == "set_leader":
                master.leading = bool(args.get("leading", True))
                master.redirect_to = args.get("redirect_to")
            else:
                return Response.text(404, f"Unknown test hook {name!r}")
        except (KeyError, RuntimeError, ValueError) as exc:
            return Response.text(400, f"{type(exc).__name__}: {exc}")
        return Response.json(200, {})
