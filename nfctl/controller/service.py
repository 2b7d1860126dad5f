"""FleetService: the operators' gRPC service (nodes, functions, history, events, commands,
rollouts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.controller.node import NodeEntry
from nfctl.controller.pbwire import repeated_field
from nfctl.controller.rollout.engine import RolloutEngine, RolloutError
from nfctl.controller.service_base import ServiceBase
from nfctl.controller.session import Session
from nfctl.controller.staleness import is_stale
from nfctl.controller.watchers import Watcher

T = TypeVar("T")


class FleetService(ServiceBase, pbg.FleetServiceServicer):
    """The operator-facing gRPC service: reads answered from the fleet, commands (reconcile,
    suspend, resume) sent to the selected nodes' streams, every call authorised first."""

    async def _call(self, method: str, context: Any, handler: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        code = "OK"
        try:
            await self.auth.require_operator(context)
            return await handler()
        except BaseException:
            code = "ERROR"
            raise
        finally:
            self.metrics.rpc_seconds.labels(method=method, code=code).observe(
                time.perf_counter() - start
            )

    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> Any:
        """A serialized ListNodesResponse (bytes): built from each node's cached status
        bytes, which is about ten times cheaper than copying 10,000 statuses into messages."""

        async def handle() -> bytes:
            now, stale_after = time.time(), self.fleet.stale_after
            entries = self.fleet.select(request.selector)
            if request.only_stale:
                entries = [e for e in entries if is_stale(e.last_seen, stale_after, now)]
            return repeated_field(1, (e.to_bytes(stale_after, now) for e in entries))

        return await self._call("ListNodes", context, handle)

    async def GetNode(self, request: pb.GetNodeRequest, context: Any) -> pb.GetNodeResponse:
        async def handle() -> pb.GetNodeResponse:
            entry = self.fleet.nodes.get(request.name)
            if entry is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.name!r}")
            assert entry is not None
            return pb.GetNodeResponse(node=entry.to_proto(self.fleet.stale_after))

        return await self._call("GetNode", context, handle)

    async def ListFunctions(
        self, request: pb.ListFunctionsRequest, context: Any
    ) -> pb.ListFunctionsResponse:
        async def handle() -> pb.ListFunctionsResponse:
            return pb.ListFunctionsResponse(functions=self.fleet.functions(request.name))

        return await self._call("ListFunctions", context, handle)

    async def GetHistory(
        self, request: pb.GetHistoryRequest, context: Any
    ) -> pb.GetHistoryResponse:
        async def handle() -> pb.GetHistoryResponse:
            await self.fleet.flush_async()  # include what is not flushed yet
            events = await asyncio.to_thread(
                self.fleet.store.history,
                node=request.node,
                nf=request.nf,
                revision=request.revision,
                since=request.since,
                until=request.until,
                limit=request.limit or 500,
            )
            return pb.GetHistoryResponse(events=events)

        return await self._call("GetHistory", context, handle)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.Event]:
        await self.auth.require_operator(context)
        watcher = Watcher(request)
        self.fleet.watchers.add(watcher)
        # what the client has (a resumed watch) and what this stream sent: an event may be
        # both replayed from the store and queued live
        have = dict(request.after_sequences)
        sent: set[tuple[str, str, int]] = set()

        def new(event: pb.Event) -> bool:
            key = (event.node, event.epoch, event.sequence)
            if event.sequence <= have.get(event.node, 0) or key in sent:
                return False
            sent.add(key)
            return True

        try:
            if request.include_history or request.since:
                await self.fleet.flush_async()
                replay = await asyncio.to_thread(
                    self.fleet.store.history,
                    node=request.node,
                    nf=request.nf,
                    reason=request.reason,
                    since=request.since,
                    limit=10_000 if request.since else 100,
                )
                for event in replay:
                    if new(event):
                        yield event
            while watcher in self.fleet.watchers:
                event = await watcher.queue.get()
                if new(event):
                    yield event
        finally:
            self.fleet.watchers.discard(watcher)

    async def _send(
        self, entries: list[NodeEntry], command: pb.Command, kind: str
    ) -> tuple[list[str], list[str]]:
        if self.fanout is not None:
            sent, offline = await self.fanout.send(entries, command)
            self.metrics.commands.labels(kind=kind).inc(len(sent))
            return sent, offline
        sent, offline = [], []
        # serialized once for every stream
        message = pb.ControllerMessage(command=command).SerializeToString()
        for entry in entries:
            session: Session | None = entry.session
            if session is None:
                offline.append(entry.name)
                continue
            session.send(message)
            sent.append(entry.name)
        self.metrics.commands.labels(kind=kind).inc(len(sent))
        return sent, offline

    async def reconcile(
        self, entries: list[NodeEntry], revision: str, reason: str
    ) -> tuple[list[str], list[str]]:
        command = pb.Command(
            id=self.fleet.next_command_id(),
            reconcile=pb.ReconcileNow(revision=revision, reason=reason),
        )
        return await self._send(entries, command, "reconcile")

    async def Reconcile(self, request: pb.ReconcileRequest, context: Any) -> pb.ReconcileResponse:
        async def handle() -> pb.ReconcileResponse:
            sent, offline = await self.reconcile(
                self.fleet.select(request.selector), request.revision, "operator request"
            )
            return pb.ReconcileResponse(nodes=sent, offline=offline)

        return await self._call("Reconcile", context, handle)

    async def Suspend(self, request: pb.SuspendRequest, context: Any) -> pb.SuspendResponse:
        async def handle() -> pb.SuspendResponse:
            command = pb.Command(
                id=self.fleet.next_command_id(),
                suspend=pb.SetSuspended(nf=request.nf, suspended=True),
            )
            sent, offline = await self._send(
                self.fleet.select(request.selector), command, "suspend"
            )
            return pb.SuspendResponse(nodes=sent, offline=offline)

        return await self._call("Suspend", context, handle)

    async def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.ResumeResponse:
        async def handle() -> pb.ResumeResponse:
            command = pb.Command(
                id=self.fleet.next_command_id(),
                suspend=pb.SetSuspended(nf=request.nf, suspended=False),
            )
            sent, offline = await self._send(self.fleet.select(request.selector), command, "resume")
            return pb.ResumeResponse(nodes=sent, offline=offline)

        return await self._call("Resume", context, handle)

    # -- rollouts ------------------------------------------------------------------------
    async def _engine(self, context: Any) -> RolloutEngine:
        if self.rollouts is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this controller drives no rollouts (start it with --source URL)",
            )
        assert self.rollouts is not None
        return self.rollouts

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Any
    ) -> pb.GetRolloutResponse:
        async def handle() -> pb.GetRolloutResponse:
            rollout = await (await self._engine(context)).get(request.id)
            if rollout is None:
                what = f"no rollout {request.id!r}" if request.id else "no rollout yet"
                await context.abort(grpc.StatusCode.NOT_FOUND, what)
            return pb.GetRolloutResponse(rollout=rollout)

        return await self._call("GetRollout", context, handle)

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Any
    ) -> pb.ListRolloutsResponse:
        async def handle() -> pb.ListRolloutsResponse:
            limit = max(1, min(request.limit or 20, 1000))
            rollouts = await (await self._engine(context)).list(limit)
            return pb.ListRolloutsResponse(rollouts=rollouts)

        return await self._call("ListRollouts", context, handle)

    async def _act(
        self, action: str, request: pb.RolloutActionRequest, context: Any
    ) -> pb.RolloutActionResponse:
        async def handle() -> pb.RolloutActionResponse:
            engine = await self._engine(context)
            try:
                rollout = await engine.act(action, request.id, request.reason)
            except RolloutError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                raise
            return pb.RolloutActionResponse(rollout=rollout)

        return await self._call(f"{action.capitalize()}Rollout", context, handle)

    async def PauseRollout(
        self, request: pb.RolloutActionRequest, context: Any
    ) -> pb.RolloutActionResponse:
        return await self._act("pause", request, context)

    async def ResumeRollout(
        self, request: pb.RolloutActionRequest, context: Any
    ) -> pb.RolloutActionResponse:
        return await self._act("resume", request, context)

    async def PromoteRollout(
        self, request: pb.RolloutActionRequest, context: Any
    ) -> pb.RolloutActionResponse:
        return await self._act("promote", request, context)

    async def AbortRollout(
        self, request: pb.RolloutActionRequest, context: Any
    ) -> pb.RolloutActionResponse:
        return await self._act("abort", request, context)
