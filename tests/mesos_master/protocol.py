"""JSON -> scheduler::Call conversion and structural validation, as Mesos does it.

Mesos first converts the JSON into the protobuf (stout's rules: unknown fields ignored,
`null` = unset, wrong JSON types / missing required fields / bad base64 are errors, unknown
enum names are dropped from optional fields) and then validates the Call.  Both failures
are HTTP 400s with distinct message prefixes, which clients sometimes log or match on.
Only the messages the scheduler API uses are described; anything else is passed through.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

# field name -> (kind, required, repeated).  kind: a scalar kind, "enum:<Enum>",
# a message name from MESSAGES, or "any" (object, not checked further).
Field = tuple[str, bool, bool]

ENUMS: dict[str, set[str]] = {
    "CallType": {
        "UNKNOWN",
        "SUBSCRIBE",
        "TEARDOWN",
        "ACCEPT",
        "DECLINE",
        "ACCEPT_INVERSE_OFFERS",
        "DECLINE_INVERSE_OFFERS",
        "REVIVE",
        "KILL",
        "SHUTDOWN",
        "ACKNOWLEDGE",
        "ACKNOWLEDGE_OPERATION_STATUS",
        "RECONCILE",
        "RECONCILE_OPERATIONS",
        "MESSAGE",
        "REQUEST",
        "SUPPRESS",
        "UPDATE_FRAMEWORK",
    },
    "Capability": {
        "UNKNOWN",
        "REVOCABLE_RESOURCES",
        "TASK_KILLING_STATE",
        "GPU_RESOURCES",
        "SHARED_RESOURCES",
        "PARTITION_AWARE",
        "MULTI_ROLE",
        "RESERVATION_REFINEMENT",
        "REGION_AWARE",
    },
    "OperationType": {
        "UNKNOWN",
        "LAUNCH",
        "LAUNCH_GROUP",
        "RESERVE",
        "UNRESERVE",
        "CREATE",
        "DESTROY",
        "GROW_VOLUME",
        "SHRINK_VOLUME",
        "CREATE_DISK",
        "DESTROY_DISK",
    },
    "ValueType": {"SCALAR", "RANGES", "SET", "TEXT"},
    "VariableType": {"UNKNOWN", "VALUE", "SECRET"},
}

_ID: dict[str, Field] = {"value": ("string", True, False)}

MESSAGES: dict[str, dict[str, Field]] = {
    "ID": _ID,
    "Call": {
        "framework_id": ("ID", False, False),
        "type": ("enum:CallType", False, False),
        "subscribe": ("Subscribe", False, False),
        "accept": ("Accept", False, False),
        "decline": ("Decline", False, False),
        "accept_inverse_offers": ("any", False, False),
        "decline_inverse_offers": ("any", False, False),
        "revive": ("Roles", False, False),
        "suppress": ("Roles", False, False),
        "kill": ("Kill", False, False),
        "shutdown": ("Shutdown", False, False),
        "acknowledge": ("Acknowledge", False, False),
        "acknowledge_operation_status": ("any", False, False),
        "reconcile": ("Reconcile", False, False),
        "reconcile_operations": ("any", False, False),
        "message": ("Message", False, False),
        "request": ("Request", False, False),
        "update_framework": ("UpdateFramework", False, False),
    },
    "Subscribe": {
        "framework_info": ("FrameworkInfo", True, False),
        "suppressed_roles": ("string", False, True),
        "offer_constraints": ("any", False, False),
    },
    "UpdateFramework": {
        "framework_info": ("FrameworkInfo", True, False),
        "suppressed_roles": ("string", False, True),
        "offer_constraints": ("any", False, False),
    },
    "FrameworkInfo": {
        "user": ("string", True, False),
        "name": ("string", True, False),
        "id": ("ID", False, False),
        "failover_timeout": ("double", False, False),
        "checkpoint": ("bool", False, False),
        "role": ("string", False, False),
        "roles": ("string", False, True),
        "hostname": ("string", False, False),
        "principal": ("string", False, False),
        "webui_url": ("string", False, False),
        "capabilities": ("Capability", False, True),
        "labels": ("Labels", False, False),
        "offer_filters": ("any", False, False),
    },
    "Capability": {"type": ("enum:Capability", False, False)},
    "Labels": {"labels": ("Label", False, True)},
    "Label": {"key": ("string", True, False), "value": ("string", False, False)},
    "Filters": {"refuse_seconds": ("double", False, False)},
    "Accept": {
        "offer_ids": ("ID", False, True),
        "operations": ("Operation", False, True),
        "filters": ("Filters", False, False),
    },
    "Decline": {"offer_ids": ("ID", False, True), "filters": ("Filters", False, False)},
    "Roles": {"roles": ("string", False, True)},
    "Operation": {
        "type": ("enum:OperationType", False, False),
        "id": ("ID", False, False),
        "launch": ("Launch", False, False),
        "launch_group": ("any", False, False),
        "reserve": ("any", False, False),
        "unreserve": ("any", False, False),
        "create": ("any", False, False),
        "destroy": ("any", False, False),
    },
    "Launch": {"task_infos": ("TaskInfo", False, True)},
    "TaskInfo": {
        "name": ("string", True, False),
        "task_id": ("ID", True, False),
        "agent_id": ("ID", True, False),
        "resources": ("Resource", False, True),
        "executor": ("any", False, False),
        "command": ("CommandInfo", False, False),
        "container": ("any", False, False),
        "health_check": ("any", False, False),
        "check": ("any", False, False),
        "kill_policy": ("KillPolicy", False, False),
        "data": ("bytes", False, False),
        "labels": ("Labels", False, False),
        "discovery": ("any", False, False),
        "max_completion_time": ("Duration", False, False),
        "limits": ("any", False, False),
    },
    "CommandInfo": {
        "uris": ("URI", False, True),
        "environment": ("Environment", False, False),
        "shell": ("bool", False, False),
        "value": ("string", False, False),
        "arguments": ("string", False, True),
        "user": ("string", False, False),
    },
    "URI": {
        "value": ("string", True, False),
        "executable": ("bool", False, False),
        "extract": ("bool", False, False),
        "cache": ("bool", False, False),
        "output_file": ("string", False, False),
    },
    "Environment": {"variables": ("Variable", False, True)},
    "Variable": {
        "name": ("string", True, False),
        "type": ("enum:VariableType", False, False),
        "value": ("string", False, False),
        "secret": ("any", False, False),
    },
    "Resource": {
        "name": ("string", True, False),
        "type": ("enum:ValueType", True, False),
        "scalar": ("Scalar", False, False),
        "ranges": ("Ranges", False, False),
        "set": ("Set", False, False),
        "role": ("string", False, False),
        "allocation_info": ("any", False, False),
        "reservation": ("any", False, False),
        "reservations": ("any", False, True),
        "disk": ("any", False, False),
        "revocable": ("any", False, False),
        "shared": ("any", False, False),
        "provider_id": ("any", False, False),
    },
    "Scalar": {"value": ("double", True, False)},
    "Ranges": {"range": ("Range", False, True)},
    "Range": {"begin": ("uint", True, False), "end": ("uint", True, False)},
    "Set": {"item": ("string", False, True)},
    "KillPolicy": {"grace_period": ("Duration", False, False)},
    "Duration": {"nanoseconds": ("int", True, False)},
    "Kill": {
        "task_id": ("ID", True, False),
        "agent_id": ("ID", False, False),
        "kill_policy": ("KillPolicy", False, False),
    },
    "Shutdown": {"executor_id": ("ID", True, False), "agent_id": ("ID", True, False)},
    "Acknowledge": {
        "agent_id": ("ID", True, False),
        "task_id": ("ID", True, False),
        "uuid": ("bytes", True, False),
    },
    "Reconcile": {"tasks": ("ReconcileTask", False, True)},
    "ReconcileTask": {"task_id": ("ID", True, False), "agent_id": ("ID", False, False)},
    "Message": {
        "agent_id": ("ID", True, False),
        "executor_id": ("ID", True, False),
        "data": ("bytes", True, False),
    },
    "Request": {"requests": ("ResourceRequest", False, True)},
    "ResourceRequest": {"agent_id": ("ID", False, False), "resources": ("Resource", False, True)},
}

# Call type -> the sub-object validation requires (REVIVE/SUPPRESS/TEARDOWN need none).
REQUIRED_SUBOBJECT = {
    "ACCEPT": "accept",
    "DECLINE": "decline",
    "ACCEPT_INVERSE_OFFERS": "accept_inverse_offers",
    "DECLINE_INVERSE_OFFERS": "decline_inverse_offers",
    "KILL": "kill",
    "SHUTDOWN": "shutdown",
    "ACKNOWLEDGE": "acknowledge",
    "ACKNOWLEDGE_OPERATION_STATUS": "acknowledge_operation_status",
    "RECONCILE": "reconcile",
    "RECONCILE_OPERATIONS": "reconcile_operations",
    "MESSAGE": "message",
    "REQUEST": "request",
    "UPDATE_FRAMEWORK": "update_framework",
}


class ConversionError(ValueError):
    """JSON that does not convert to the protobuf message."""


class ValidationError(ValueError):
    """A Call that converts but fails scheduler::Call validation."""


def decode_bytes(value: str) -> bytes:
    """Standard base64, strictly (what stout does for `bytes` fields)."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConversionError(f"Failed to base64-decode '{value}'") from exc


def _convert_scalar(kind: str, name: str, value: Any) -> Any:
    if kind == "string":
        if not isinstance(value, str):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        return value
    if kind == "double":
        if isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        return value
    if kind in ("int", "uint"):
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError as exc:
                raise ConversionError(f"Failed to convert '{value}' for field '{name}'") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        if isinstance(value, float) and not value.is_integer():
            raise ConversionError(f"Not expecting a fractional number for field '{name}'")
        if kind == "uint" and value < 0:
            raise ConversionError(f"Negative value for unsigned field '{name}'")
        return int(value)
    if kind == "bytes":
        if not isinstance(value, str):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        decode_bytes(value)
        return value
    raise AssertionError(kind)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


def convert(message: str, obj: Any, path: str = "") -> dict[str, Any]:
    """Check `obj` against MESSAGES[message]; returns a cleaned copy (nulls and unknown
    optional enum values removed).  Raises ConversionError like stout's protobuf::parse."""
    if not isinstance(obj, dict):
        raise ConversionError(f"Expecting a JSON object for '{path or message}'")
    spec = MESSAGES[message]
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key not in spec:
            out[key] = value  # unknown fields are ignored (kept for pass-through)
            continue
        if value is None:
            continue
        kind, required, repeated = spec[key]
        name = f"{path}.{key}" if path else key
        if repeated:
            if not isinstance(value, list):
                raise ConversionError(f"Not expecting a JSON {_json_type(value)} for repeated field '{name}'")
            items = []
            for item in value:
                converted = _convert_one(kind, name, item, required=False)
                if converted is not _DROP:
                    items.append(converted)
            out[key] = items
        else:
            converted = _convert_one(kind, name, value, required)
            if converted is not _DROP:
                out[key] = converted
    for key, (_kind, required, _repeated) in spec.items():
        if required and key not in out:
            raise ConversionError(f"Missing required fields: {(path + '.' if path else '')}{key}")
    return out


_DROP = object()


def _convert_one(kind: str, name: str, value: Any, required: bool) -> Any:
    if kind.startswith("enum:"):
        if not isinstance(value, str):
            raise ConversionError(f"Not expecting a JSON {_json_type(value)} for field '{name}'")
        if value not in ENUMS[kind[5:]]:
            if required:
                raise ConversionError(f"Failed to find enum for '{value}' in field '{name}'")
            return _DROP
        return value
    if kind == "any":
        if not isinstance(value, dict):
            raise ConversionError(f"Expecting a JSON object for field '{name}'")
        return value
    if kind in MESSAGES:
        return convert(kind, value, name)
    return _convert_scalar(kind, name, value)


def validate_call(call: dict[str, Any]) -> None:
    """scheduler::call::validate — structural checks that produce a 400."""
    ctype = call.get("type")
    if ctype is None:
        raise ValidationError("Expecting 'type' to be present")
    if ctype == "SUBSCRIBE":
        if "subscribe" not in call:
            raise ValidationError("Expecting 'subscribe' to be present")
        info = call["subscribe"]["framework_info"]
        top = call.get("framework_id", {}).get("value")
        inner = info.get("id", {}).get("value")
        if top != inner:
            raise ValidationError("'framework_id' differs from 'subscribe.framework_info.id'")
        return
    if "framework_id" not in call:
        raise ValidationError("Expecting 'framework_id' to be present")
    sub = REQUIRED_SUBOBJECT.get(ctype)
    if sub is not None and sub not in call:
        raise ValidationError(f"Expecting '{sub}' to be present")
    if ctype == "ACKNOWLEDGE":
        if len(decode_bytes(call["acknowledge"]["uuid"])) != 16:
            raise ValidationError("Invalid UUID: not 16 bytes")
    if ctype == "UPDATE_FRAMEWORK":
        info = call["update_framework"]["framework_info"]
        if info.get("id", {}).get("value") != call["framework_id"]["value"]:
            raise ValidationError("'framework_id' differs from 'update_framework.framework_info.id'")
