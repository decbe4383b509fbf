"""Tasks: launch validation, the agent side of a task's life, status updates and their
acknowledgements, KILL and reconciliation (sections 5, 9 and 11 of the reference).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

from .base import MasterBase, update_event, validate_task_id
from .executor import DEFAULT_GRACE, CommandExecutor, TaskContext
from .model import Agent, Framework, Task
from .resources import ResourceError, Resources
from .updates import TERMINAL_STATES, StatusUpdateStream, new_uuid


class TasksMixin(MasterBase):
    def _validate_task(self, fw: Framework, agent: Agent, info: dict[str, Any], pool: Resources) -> str | None:
        task_id = info["task_id"]["value"]
        problem = validate_task_id(task_id)
        if problem:
            return f"Task ID '{task_id}' is invalid: {problem}"
        if task_id in fw.tasks:
            return f"Task has duplicate ID: {task_id}"
        if info["agent_id"]["value"] != agent.id:
            return f"Task uses agent ID {info['agent_id']['value']} which does not match the offer's agent {agent.id}"
        if ("command" in info) == ("executor" in info):
            return "Task should have at least one (but not both) of CommandInfo or ExecutorInfo present"
        if "executor" in info:
            return "Custom executors are not supported by this test master"
        nanos = ((info.get("kill_policy") or {}).get("grace_period") or {}).get("nanoseconds")
        if nanos is not None and int(nanos) < 0:
            return "Task's 'kill_policy.grace_period' must be non-negative"
        raw = info.get("resources") or []
        if not raw:
            return "Task uses no resources"
        for item in raw:
            if item.get("role", "*") != "*" or item.get("reservations") or item.get("revocable") is not None:
                return (
                    f"Total resources {raw} required by task and its executor is more than available {pool.summary()}"
                )
            alloc = (item.get("allocation_info") or {}).get("role")
            if alloc is not None and fw.multi_role and alloc not in fw.roles:
                return f"Resource allocated to role '{alloc}' the framework is not subscribed to"
        try:
            resources = Resources.from_json(raw)
        except ResourceError as exc:
            return f"Invalid resources: {exc}"
        if resources.is_empty():
            return "Task uses no resources"
        if not pool.contains(resources):
            return (
                f"Total resources {resources.summary()} required by task and its executor "
                f"is more than available {pool.summary()}"
            )
        return None

    def _launch(self, fw: Framework, agent: Agent, role: str, info: dict[str, Any], resources: Resources) -> None:
        task_id = info["task_id"]["value"]
        container = str(uuid.uuid4())
        sandbox = os.path.join(
            self.work_dir, "agents", agent.id, "frameworks", fw.id, "executors", task_id, "runs", container
        )
        os.makedirs(sandbox, exist_ok=True)
        holder: list[Task] = []
        updates = StatusUpdateStream(
            lambda s: self._forward(holder[0], s), self.config.update_retry_interval, self.config.update_retry_max
        )
        task = Task(fw.id, task_id, agent.id, role, info, resources, updates)
        holder.append(task)
        fw.tasks[task_id] = task
        agent.used = agent.used + resources
        ctx = TaskContext(
            info,
            fw.id,
            agent.id,
            agent.endpoint,
            role,
            sandbox,
            self.config.run_processes,
            "TASK_KILLING_STATE" in fw.capabilities,
        )
        executor = CommandExecutor(
            ctx, lambda state, msg, reason, extra: self._on_task_state(task, state, msg, reason, extra)
        )
        task.executor = executor
        self._executors.add(executor)
        executor.start()
        assert executor._task is not None
        executor._task.add_done_callback(lambda _f: self._executors.discard(executor))

    def _on_task_state(
        self, task: Task, state: str, message: str | None, reason: str | None, extra: dict[str, Any]
    ) -> None:
        """A state change inside the (simulated) agent: record it and queue an update."""
        fw = self.frameworks.get(task.framework_id) or self.orphans.get(task.framework_id)
        if fw is None or fw.tasks.get(task.task_id) is not task:
            return  # framework removed / task gone: nobody to tell
        from_agent = reason in ("REASON_CONTAINER_LAUNCH_FAILED", "REASON_TASK_KILLED_DURING_LAUNCH")
        status: dict[str, Any] = {
            "task_id": {"value": task.task_id},
            "state": state,
            "source": "SOURCE_AGENT" if from_agent else "SOURCE_EXECUTOR",
            "agent_id": {"value": task.agent_id},
            "timestamp": time.time(),
            "uuid": new_uuid(),
        }
        if not from_agent:
            status["executor_id"] = {"value": task.task_id}
        if message is not None:
            status["message"] = message
        if reason is not None:
            status["reason"] = reason
        status.update(extra)
        task.state = state
        if state in TERMINAL_STATES:
            self._release(task)
        task.updates.add(status)
        if state in TERMINAL_STATES and not from_agent:
            # The command executor exits (status 0) once its task is terminal; the agent
            # reports that as an ExitedExecutorMessage, i.e. FAILURE with executor_id.
            asyncio.get_running_loop().call_later(0.1, self._executor_exited, task)

    def _executor_exited(self, task: Task) -> None:
        fw = self.frameworks.get(task.framework_id)
        if fw is not None and fw.connected and task.agent_id in self.agents:
            failure = {"agent_id": {"value": task.agent_id}, "executor_id": {"value": task.task_id}, "status": 0}
            fw.send({"type": "FAILURE", "failure": failure})

    def _forward(self, task: Task, status: dict[str, Any]) -> None:
        """The agent (re)sends the oldest unacknowledged update through the master."""
        fw = self.frameworks.get(task.framework_id) or self.orphans.get(task.framework_id)
        if fw is None or fw.tasks.get(task.task_id) is not task:
            return
        task.status_update_state = status["state"]
        task.last_status = status
        fw.send(update_event(status))

    def _release(self, task: Task) -> None:
        if task.released:
            return
        task.released = True
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used - task.resources
        self.trigger_allocation()

    def kill(self, fw: Framework, body: dict[str, Any]) -> None:
        task_id = body["task_id"]["value"]
        agent_id = (body.get("agent_id") or {}).get("value")
        task = fw.tasks.get(task_id)
        if task is None:
            self.reconcile(
                fw, [{"task_id": {"value": task_id}, **({"agent_id": {"value": agent_id}} if agent_id else {})}]
            )
            return
        if task.terminal or task.executor is None:
            return
        nanos = ((body.get("kill_policy") or {}).get("grace_period") or {}).get("nanoseconds")
        grace = int(nanos) / 1e9 if nanos is not None else task.grace_period()
        task.executor.kill(DEFAULT_GRACE if grace is None else grace)

    def acknowledge(self, fw: Framework, body: dict[str, Any]) -> None:
        task = fw.tasks.get(body["task_id"]["value"])
        if task is None or task.agent_id != body["agent_id"]["value"]:
            return
        acked = task.updates.acknowledge(body["uuid"])
        if acked is not None and task.updates.terminal_acknowledged:
            task.updates.close()
            del fw.tasks[task.task_id]
            self._remember_completed(task)

    def reconcile(self, fw: Framework, tasks: list[dict[str, Any]]) -> None:
        if not tasks:
            for task in fw.tasks.values():
                fw.send(update_event(self._reconcile_known(fw, task)))
            return
        for item in tasks:
            task_id = item["task_id"]["value"]
            agent_id = (item.get("agent_id") or {}).get("value")
            task = fw.tasks.get(task_id)
            if task is not None:
                status = self._reconcile_known(fw, task)
            elif agent_id is not None and agent_id in self.agents:
                status = self._master_status(
                    fw,
                    task_id,
                    "TASK_GONE",
                    "REASON_RECONCILIATION",
                    "Reconciliation: Task is unknown to the agent",
                    agent_id,
                )
            else:
                status = self._master_status(
                    fw, task_id, "TASK_UNKNOWN", "REASON_RECONCILIATION", "Reconciliation: Task is unknown", agent_id
                )
            fw.send(update_event(status))

    def _reconcile_known(self, fw: Framework, task: Task) -> dict[str, Any]:
        state = task.status_update_state or task.state
        status = self._master_status(
            fw, task.task_id, state, "REASON_RECONCILIATION", "Reconciliation: Latest task state", task.agent_id
        )
        if task.last_status and "container_status" in task.last_status:
            status["container_status"] = task.last_status["container_status"]
        return status

    def find_task(self, task_id: str, framework_id: str | None = None) -> Task:
        for fw in self.all_frameworks():
            if framework_id is not None and fw.id != framework_id:
                continue
            if task_id in fw.tasks:
                return fw.tasks[task_id]
        raise KeyError(f"unknown task {task_id}")

    def kill_task_process(self, task_id: str, framework_id: str | None = None, sig: int = signal.SIGKILL) -> None:
        """Fault hook: the task's process dies (-> TASK_FAILED), not a scheduler KILL."""
        task = self.find_task(task_id, framework_id)
        if task.executor is None or not task.executor.signal_process(sig):
            raise RuntimeError(f"task {task_id} has no running process")
