"""Ray Serve's request router for the model replicas: the prefix-affinity rule (affinity.py) over
the replicas Serve reports now. Serve calls it inside the ingress's deployment handle, where the
forwarded request, and so its prompt, is known (Serve's HTTP proxy picks a replica before it reads a
body; a handle's router sees the call's arguments).

State lives in this router only (one per ingress replica) and is rebuilt from what Serve reports:
replicas that are gone are forgotten at the next choice, so a redeploy starts clean."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from server.scale.affinity import SLACK, PrefixAffinity

MAX_PENDING = 4096  # calls chosen but not yet reported routed, remembered (bounded)


def _prompt(pending: PendingRequest | None) -> list[int] | str | None:
    """The call's route_key (server/scale/asgi_call.Call), if it is a forwarded call."""
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return None
    key: list[int] | str | None = pending.args[0].get("route_key")  # Ray is untyped here: the Call's
    return key


# Ray is not installed for type checking (and ships no types): its RequestRouter is Any here.
class PrefixAffinityRouter(RequestRouter):  # type: ignore[misc]
    def initialize_state(self, slack: float = SLACK, **kwargs: Any) -> None:
        self.rule = PrefixAffinity(slack=slack)
        # Calls counted at their choice, not when Serve reports them routed: calls chosen at once (a
        # split request's parts) must see each other's counts, or they all pick the same replica.
        self.counted: OrderedDict[int, str] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, in the rule's order: Serve sends to the first that has
        room (a full replica rejects, and the next is tried)."""
        if not hasattr(self, "rule"):
            self.initialize_state()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        prompt = _prompt(pending_request)
        key = id(pending_request)
        if key in self.counted:  # a retry: its count is not the rule's to weigh again
            self.rule.unsend(self.counted.pop(key))
        order = self.rule.order(prompt, list(by_id))
        if order and pending_request is not None:
            self.rule.sent(order[0], prompt)
            self.counted[key] = order[0]
            while len(self.counted) > MAX_PENDING:  # calls cancelled before routing are never reported
                self.counted.popitem(last=False)
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        chosen = self.counted.pop(id(pending_request), None)
        if chosen != replica_id.unique_id:  # it went to another rank's replica (or was never counted)
            if chosen is not None:
                self.rule.unsend(chosen)
            self.rule.sent(replica_id.unique_id, _prompt(pending_request))
