"""Frameworks and their subscriptions: SUBSCRIBE, failover, disconnection, TEARDOWN.

Follows section 7 of the reference: one stream per framework (the newest wins, the old
one gets ERROR "Framework failed over"), offers never survive a re-subscription, a broken
stream starts the failover timer, and a removed framework can never come back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .base import MasterBase, error_event, validate_role
from .executor import DEFAULT_GRACE
from .model import Framework
from .stream import Subscription

log = logging.getLogger(__name__)


class SubscriptionsMixin(MasterBase):
    def subscribe(self, call: dict[str, Any]) -> Subscription:
        """SUBSCRIBE: new framework, failover of a known one, or a refusal ERROR stream."""
        body = call["subscribe"]
        info = dict(body["framework_info"])
        fw_id = (info.get("id") or {}).get("value")
        sub = Subscription(self.config.chunk_size)
        roles, multi, caps, error = self._framework_roles(info)
        suppressed = set(body.get("suppressed_roles") or [])
        if error is None and fw_id in self.removed_frameworks:
            error = "Framework has been removed"
        if error is None and not suppressed <= set(roles):
            error = f"Suppressed roles {sorted(suppressed - set(roles))} are not contained in roles"
        if error is not None:
            sub.send(error_event(error))
            sub.close()
            return sub

        if fw_id in self.orphans:
            self.frameworks[fw_id] = self.orphans.pop(fw_id)
        fw = self.frameworks.get(fw_id) if fw_id else None
        if fw is not None and info.get("principal") != fw.info.get("principal"):
            sub.send(error_event("Changing framework's principal is not allowed"))
            sub.close()
            return sub
        if fw is not None:
            old, fw.subscription = fw.subscription, None
            if old is not None and not old.closed:
                old.send(error_event("Framework failed over"))
                old.close()
            if fw.failover_timer is not None:
                fw.failover_timer.cancel()
                fw.failover_timer = None
            self._discard_offers(fw, rescind=False)
            info["user"] = fw.info.get("user", info.get("user"))
            if "checkpoint" in fw.info:
                info["checkpoint"] = fw.info["checkpoint"]
            self._apply_framework_info(fw, info, roles, multi, caps, suppressed)
        else:
            if not fw_id:
                fw_id = f"{self.id}-{self._framework_counter:04d}"
                self._framework_counter += 1
            info["id"] = {"value": fw_id}
            fw = Framework(fw_id, info, roles, multi, caps, suppressed)
            self.frameworks[fw_id] = fw
        fw.info["id"] = {"value": fw_id}
        sub._on_closed = lambda s, fid=fw_id: self._on_stream_closed(fid, s)
        fw.subscription = sub
        sub.send(
            {
                "type": "SUBSCRIBED",
                "subscribed": {
                    "framework_id": {"value": fw_id},
                    "heartbeat_interval_seconds": float(self.config.heartbeat_interval),
                    "master_info": self.master_info(),
                },
            }
        )
        sub.start_heartbeats(self.config.heartbeat_interval)
        self.trigger_allocation()
        return sub

    def _framework_roles(self, info: dict[str, Any]) -> tuple[list[str], bool, set[str], str | None]:
        caps = {c["type"] for c in info.get("capabilities") or [] if "type" in c}
        multi = "MULTI_ROLE" in caps
        if multi:
            if "role" in info:
                return [], multi, caps, "'FrameworkInfo.role' must not be set when MULTI_ROLE"
            roles = list(info.get("roles") or [])
        else:
            if info.get("roles"):
                return [], multi, caps, "'FrameworkInfo.roles' is set without MULTI_ROLE"
            roles = [info.get("role", "*")]
        if len(set(roles)) != len(roles):
            return [], multi, caps, f"'FrameworkInfo.roles' contains duplicate items: {roles}"
        for role in roles:
            err = validate_role(role)
            if err:
                return [], multi, caps, err
            allowed = self.config.allowed_roles
            if allowed is not None and role != "*" and role not in allowed:
                return [], multi, caps, f"Role '{role}' is not present in the master's --roles"
        return roles, multi, caps, None

    def _apply_framework_info(
        self, fw: Framework, info: dict[str, Any], roles: list[str], multi: bool, caps: set[str], suppressed: set[str]
    ) -> None:
        removed_roles = set(fw.roles) - set(roles)
        for offer in [o for o in self.offers.values() if o.framework_id == fw.id]:
            if offer.role in removed_roles:
                self._remove_offer(offer, rescind=True)
        unsuppressed = fw.suppressed - suppressed
        fw.filters = {k: v for k, v in fw.filters.items() if k[1] not in unsuppressed and k[1] in roles}
        info["id"] = {"value": fw.id}
        fw.info, fw.roles, fw.multi_role, fw.capabilities = info, roles, multi, caps
        fw.suppressed = suppressed

    def update_framework(self, fw: Framework, body: dict[str, Any]) -> str | None:
        """UPDATE_FRAMEWORK; returns an error message for a 400, None on success."""
        info = dict(body["framework_info"])
        for key in ("principal", "user", "checkpoint"):
            if info.get(key) != fw.info.get(key) and (key in info or key in fw.info):
                if not (key == "checkpoint" and not info.get(key) and not fw.info.get(key)):
                    return f"Updating 'FrameworkInfo.{key}' is unsupported"
        roles, multi, caps, error = self._framework_roles(info)
        if error:
            return error
        suppressed = set(body.get("suppressed_roles") or [])
        if not suppressed <= set(roles):
            return "Suppressed roles are not contained in roles"
        self._apply_framework_info(fw, info, roles, multi, caps | fw.capabilities, suppressed)
        self.trigger_allocation()
        return None

    def _on_stream_closed(self, fw_id: str, sub: Subscription) -> None:
        fw = self.frameworks.get(fw_id)
        if fw is None or fw.subscription is not sub:
            return
        self._disconnect(fw)

    def _disconnect(self, fw: Framework) -> None:
        """Stream broke: deactivate, drop offers, start the failover timer."""
        fw.subscription = None
        self._discard_offers(fw, rescind=False)
        timeout = float(fw.info.get("failover_timeout") or 0.0)
        loop = asyncio.get_running_loop()
        fw.failover_timer = loop.call_later(max(0.0, min(timeout, 1e9)), self._failover_expired, fw.id)

    def _failover_expired(self, fw_id: str) -> None:
        fw = self.frameworks.get(fw_id)
        if fw is not None and not fw.connected:
            log.info("framework %s failover timeout expired", fw_id)
            self.remove_framework(fw)

    def drop_stream(self, fw_id: str) -> None:
        """Fault hook: break the framework's subscription connection."""
        fw = self.frameworks[fw_id]
        if fw.subscription is not None:
            fw.subscription.abort()

    def remove_framework(self, fw: Framework) -> None:
        """TEARDOWN or failover expiry: kill its tasks, forget it, close its stream."""
        if fw.failover_timer is not None:
            fw.failover_timer.cancel()
            fw.failover_timer = None
        self._discard_offers(fw, rescind=False)
        for task in list(fw.tasks.values()):
            task.updates.close()
            if task.executor is not None:
                grace = task.grace_period()
                task.executor.kill(DEFAULT_GRACE if grace is None else grace)
            self._release(task)
            self._remember_completed(task)
        fw.tasks.clear()
        del self.frameworks[fw.id]
        self.removed_frameworks.add(fw.id)
        sub, fw.subscription = fw.subscription, None
        if sub is not None:
            sub.close()
        self.trigger_allocation()
