"""The dispatcher: which call runs next, and where. Shared by the scheduler daemon and the
simulator, so both make exactly the same decisions.

A pure state machine (dask's scheduler-state style): callers feed it events (a call is ready, a
call finished, a replica came or went) with the time, and get back `Assign` instructions to carry
out. It keeps one queue per model, ordered FIFO or by least slack; a call leaves the queue only
when some replica of its model has room (``concurrency`` running plus ``replica_queue`` waiting
there), so the queue order decides who goes first under load, and the router decides where.

About 600 lines: the queues, the replicas' open slots and the per-pool figures the scaler reads
change together on every event, so they stay in one state machine.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from swarmx.frozen import frozen
from swarmx.models.dist import LatencyDist, trusted_dists
from swarmx.sched import tailmath
from swarmx.sched.prefix import PrefixIndexes, ReuseGaps
from swarmx.sched.router import (
    Forecaster,
    PrefillDuty,
    ReplicaView,
    RouteInput,
    Router,
    Work,
)
from swarmx.stats import quantile, upper_quantile
from swarmx.workflow.engine import CallSpec

QueueOrder = Literal["fifo", "slack"]

DEFAULT_KV_CACHE_TOKENS = 500_000
"""A replica's KV-cache capacity when it announces none: an 8B model's on an 80 GB GPU, about
(80 - 16) GB at 128 KiB a token."""

TOOL_POOL = "tool"
"""The model name under which nodes announce their tool-run slots."""


def pool_of(call: CallSpec) -> str:
    """The replicas a call can run on are those announcing this model name."""
    return TOOL_POOL if call.kind == "tool" else call.model


@frozen
class Ticket:
    """A call ready to run, with what the queue order and the router need to know about it."""

    call: CallSpec
    arrived_s: float
    deadline_s: float | None = None
    """When this call should finish to keep its workflow on schedule (for deadline routing)."""
    slack_s: float | None = None
    """The workflow's slack at arrival: deadline - arrival - predicted remaining critical path.
    The slack order runs the smallest ``arrived_s + slack_s`` (latest start time) first, which
    is the same as least slack now, for every ``now``."""


@frozen
class Assign:
    """Send ``ticket.call`` to ``replica``."""

    ticket: Ticket
    replica: ReplicaView
    """The replica as it was when chosen (before this call was added to it)."""
    service: LatencyDist | None
    """The call's predicted service time on that replica, where a forecast was made."""
    completion: LatencyDist | None
    """The router's predicted completion time (wait + service), where it made one."""
    cached_tokens: int | None = None
    """Prompt tokens of the call the prefix index expected that replica to hold; None for a
    call without prefix blocks."""


@dataclass
class _Replica:
    view: ReplicaView
    live: bool = True
    work: dict[str, Work] = field(default_factory=dict)
    duty: PrefillDuty = field(default_factory=PrefillDuty)
    """The prefill this dispatcher sent it lately (`ReplicaView.prefill_duty`)."""
    _current: ReplicaView | None = None

    def current(self) -> ReplicaView:
        """The view routers see; rebuilt only after the replica's work changed."""
        if self._current is None:
            # a copy of the announced view's fields with this replica's work: written straight
            # into a new instance's dict, as neither replace() nor the frozen __init__ would
            # (this runs twice per routed call)
            work = tuple(self.work.values())
            cur = object.__new__(ReplicaView)
            cur.__dict__.update(
                self.view.__dict__, outstanding=len(work), work=work, prefill_duty=self.duty
            )
            self._current = cur
        return self._current

    def changed(self) -> None:
        self._current = None


PREPARE_BATCH = 16
"""Queued calls a drain hands the forecaster at once (`Forecaster.prepare`)."""

LOAD_BANDS = 4
"""Occupancy bands (share of a replica's slots taken when a call was placed on it) in which
what calls took over their forecasts is kept: a batching server serves each call slower the
fuller it is, and the tail scaler must know by how much to see what another replica buys."""
MIN_BAND_CALLS = 20
"""Calls a band needs before the scaler trusts it."""


MIX_POINTS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Equiprobable points one call's forecast stands for in its pool's service mixture."""
MIX_CALLS = 512
"""Recent forecasts a pool's service mixture is made of."""


@dataclass
class ServiceMix:
    """Recent calls' service forecasts as one distribution, the mixture over calls: a pool
    serves short and long calls, and averaging their quantiles (a geometric mean) would hide
    the long ones that queueing is made of. The points are kept sorted as they come and go
    (the slack queue reads the mixture at every call), so reading a quantile is an index."""

    levels: tuple[float, ...]
    samples: deque[tuple[float, ...]] = field(default_factory=deque)
    _sorted: list[float] = field(default_factory=list)
    _dist: LatencyDist | None = None
    _stale: int = 0
    """Calls added since ``_dist`` was read."""

    def add(self, dist: LatencyDist) -> None:
        v = dist.values_s
        point = v[0] == v[-1]
        new = (v[0],) * len(MIX_POINTS) if point else dist.quantiles(MIX_POINTS)
        xs, k = self._sorted, len(MIX_POINTS)
        if len(self.samples) >= MIX_CALLS:
            old = self.samples.popleft()
            if old[0] == old[-1]:  # a point: its copies sit side by side, one cut removes them
                i = bisect.bisect_left(xs, old[0])
                del xs[i : i + k]
            else:
                for x in old:
                    del xs[bisect.bisect_left(xs, x)]
        self.samples.append(new)
        if point:
            i = bisect.bisect_left(xs, new[0])
            xs[i:i] = new
        else:
            for x in new:
                bisect.insort(xs, x)
        if dist.levels != self.levels:
            self.levels, self._dist = dist.levels, None
        self._stale += 1

    @property
    def calls(self) -> int:
        return len(self.samples)

    def dist(self) -> LatencyDist:
        """The mixture, read again once more than 1/32 of its calls are new since the last
        read: it moves slowly once full, and a mixture that stays the same object while it
        does lets the slack queue's critical paths reuse the quantiles they read of it."""
        if self._dist is None or self._stale * 32 > len(self.samples):
            xs = self._sorted
            (self._dist,) = trusted_dists(  # sorted points: its quantiles increase
                self.levels, [[upper_quantile(xs, p) for p in self.levels]]
            )
            self._stale = 0
        return self._dist


@dataclass
class PoolStats:
    """Per model, since the scaler last looked."""

    arrivals: int = 0
    service: ServiceMix | None = None
    """Recent service forecasts (a typical call's distribution)."""
    slowdown: dict[int, deque[float]] = field(default_factory=dict)
    """Recent calls' actual service over their forecast median, per `LOAD_BANDS` band of their
    replica's occupancy when they were placed: how much batching and the calls that joined
    later slowed them, which forecasts made at placement cannot see. A ratio, not seconds: which
    calls go to emptier replicas (routers send long calls there) must not read as speed."""
    missed: float = 0.0
    """Sum over the calls placed with a deadline of their predicted chance of missing it."""
    with_deadline: int = 0


PREFILL_SAMPLES = 32
"""Recent calls per replica its prefill speed and decode pace are read from."""
MIN_PREFILL_TOKENS = 512
"""Prompt tokens to prefill below which a first token says more of overheads than speed."""
MIN_DECODE_TOKENS = 16
"""Output tokens below which a call's decode says more of overheads than pace."""


class _OpenSet:
    """One model's replicas with room, by name, also grouped by load (calls outstanding, and
    others' on their engines): a
    forecasting router's candidates, the least loaded, are found without a scan of the pool
    (at 1,000 replicas the scan cost more than the forecasts). Ties keep the order in which
    replicas joined the set, as a scan would, so the choice does not depend on the index."""

    __slots__ = ("_by_load", "_joined", "_seq", "_views")

    def __init__(self) -> None:
        self._views: dict[str, ReplicaView] = {}
        self._joined: dict[str, int] = {}
        """When each replica joined (a counter): the order ties keep."""
        self._by_load: dict[int, list[tuple[int, str]]] = {}
        """Load -> (joined, replica) of the replicas with that much, sorted."""
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._views)

    def put(self, view: ReplicaView) -> None:
        name, old = view.replica, self._views.get(view.replica)
        if old is None:
            self._joined[name] = next(self._seq)
        elif old.load != view.load:
            self._leave(old)
        self._views[name] = view
        if old is None or old.load != view.load:
            tier = self._by_load.setdefault(view.load, [])
            bisect.insort(tier, (self._joined[name], name))

    def drop(self, replica: str) -> None:
        old = self._views.pop(replica, None)
        if old is not None:
            self._leave(old)
            del self._joined[replica]

    def _leave(self, view: ReplicaView) -> None:
        tier = self._by_load[view.load]
        del tier[bisect.bisect_left(tier, (self._joined[view.replica], view.replica))]
        if not tier:
            del self._by_load[view.load]

    def all(self) -> list[ReplicaView]:
        return list(self._views.values())

    def names(self) -> Iterable[str]:
        return self._views.keys()

    def least_loaded(self, k: int) -> list[ReplicaView]:
        """The ``k`` least loaded replicas, ties in the order they joined
        (what ``heapq.nsmallest`` over `all` gives)."""
        out: list[ReplicaView] = []
        for load in sorted(self._by_load):
            out.extend(self._views[name] for _, name in self._by_load[load][: k - len(out)])
            if len(out) >= k:
                break
        return out


class _MinBag:
    """A multiset of floats that gives its least: adds and removals in O(log n) amortized, as
    a heap whose removed values wait in a counter until they reach the top, rebuilt once they
    outnumber the values kept (the per-pool budgets, read at every call)."""

    __slots__ = ("_gone", "_heap", "_n_gone")

    def __init__(self) -> None:
        self._heap: list[float] = []
        self._gone: Counter[float] = Counter()
        """Removed values not yet out of the heap, with how many of each."""
        self._n_gone = 0

    def __len__(self) -> int:
        return len(self._heap) - self._n_gone

    def add(self, x: float) -> None:
        heapq.heappush(self._heap, x)

    def remove(self, x: float) -> None:
        """Remove one ``x``, which must be in the bag."""
        self._gone[x] += 1
        self._n_gone += 1
        if self._n_gone > len(self):
            kept: list[float] = []
            for v in self._heap:
                if self._gone[v]:
                    self._gone[v] -= 1
                else:
                    kept.append(v)
            heapq.heapify(kept)
            self._heap, self._n_gone = kept, 0
            self._gone.clear()

    def least(self) -> float | None:
        heap, gone = self._heap, self._gone
        while heap and heap[0] in gone:
            x = heapq.heappop(heap)
            self._n_gone -= 1
            if gone[x] == 1:
                del gone[x]
            else:
                gone[x] -= 1
        return heap[0] if heap else None


class Dispatcher:
    def __init__(
        self,
        router: Router,
        order: QueueOrder = "fifo",
        forecaster: Forecaster | None = None,
        *,
        replica_queue: int = 0,
        max_candidates: int = 64,
    ) -> None:
        if router.forecast != "none" and forecaster is None:
            raise ValueError(f"router {router.name!r} needs a forecaster")
        self.router = router
        self.order = order
        self.forecaster = forecaster
        self.replica_queue = replica_queue
        self.max_candidates = max_candidates
        """A forecasting router scores at most this many replicas, the least loaded: each one
        scored costs a forecast, and among 1,000 replicas the 64 least loaded hold the choice."""
        self.replicas: dict[str, _Replica] = {}
        self._open: dict[str, _OpenSet] = {}
        """Per model, the current views of the replicas with room: the candidates, kept up to
        date as replicas change so a decision never scans the full ones."""
        self._queues: dict[str, list[tuple[float, int, Ticket]]] = {}
        """Per model, a heap of the waiting calls in queue order (key, sequence number,
        ticket). A cancelled call's entry stays until it reaches the top or cancelled entries
        outnumber the live ones and the heap is rebuilt; ``_waiting`` tells which are live."""
        self._waiting: dict[str, tuple[float, int, Ticket]] = {}
        """call id -> its live queue entry."""
        self._live: dict[str, int] = {}
        """Per model, the live entries in its queue."""
        self._seq = itertools.count()
        self._where: dict[str, tuple[str, Ticket]] = {}
        """call id -> (replica, ticket), for calls assigned and not finished."""
        self._by_workflow: dict[str, dict[str, None]] = {}
        """workflow id -> the ids of its calls queued or assigned (an ordered set)."""
        self._budgets: dict[str, _MinBag] = {}
        """Per pool, deadline - arrival of its calls queued or assigned that have a deadline."""
        self._band: dict[str, tuple[int, float]] = {}
        """call id -> (`LOAD_BANDS` band of its replica's occupancy when it was placed, the
        median of its service forecast there)."""
        self.pools: dict[str, PoolStats] = {}
        self._by_node: dict[str, dict[str, None]] = {}
        """node -> the names of its replicas (an ordered set): a node's events touch its own."""
        self._models: collections.Counter[str] = collections.Counter()
        """model -> its replicas."""
        self._taking: collections.Counter[str] = collections.Counter()
        """model -> its replicas that take new calls."""
        self.prefixes = PrefixIndexes()
        """What each replica's prefix cache holds, as the calls routed to it say, less what its
        engine said it evicted (`engine_cache`)."""
        self.reuse = ReuseGaps()
        """How long after their last use the prefixes routed on are used again."""
        self._resets: dict[str, int] = {}
        """Replica -> the engine's count of whole-cache clears, as last reported."""
        self._speeds: dict[tuple[str, str], deque[float]] = {}
        """(replica, ``prefill`` or ``decode``) -> its recent calls' prefill tokens a second or
        decode seconds a token (`observe_prefill`, `observe_decode`)."""

    # --- replicas ---------------------------------------------------------------------------

    def add_replica(self, view: ReplicaView, now_s: float) -> list[Assign]:
        """A replica is ready (or re-registered with new figures); queued calls may go to it."""
        old = self.replicas.pop(view.replica, None)
        if old is not None:
            self._drop_open(old.view)
            self._unindex(old.view)
            self._taking[old.view.model] -= old.live
            if not view.prefill_tokens_per_s:  # measured here, not announced: kept
                view = dataclasses.replace(view, prefill_tokens_per_s=old.view.prefill_tokens_per_s)
            if not view.decode_s_per_token:
                view = dataclasses.replace(view, decode_s_per_token=old.view.decode_s_per_token)
            if not view.external:
                view = dataclasses.replace(view, external=old.view.external)
            if not view.kv_cache_tokens:  # the engine's own figure, from telemetry: kept
                view = dataclasses.replace(view, kv_cache_tokens=old.view.kv_cache_tokens)
        rep = _Replica(view, True, old.work if old else {}, old.duty if old else PrefillDuty())
        self._taking[view.model] += 1
        self.replicas[view.replica] = rep
        self._by_node.setdefault(view.node, {})[view.replica] = None
        self._models[view.model] += 1
        self._refresh(rep)
        return self._drain(view.model, now_s)

    def remove_replica(self, replica: str) -> list[str]:
        """A replica is gone; returns the ids of the calls that were on it (the caller re-runs
        them)."""
        rep = self.replicas.pop(replica, None)
        if rep is None:
            return []
        self._taking[rep.view.model] -= rep.live
        self._drop_open(rep.view)
        self._unindex(rep.view)
        self.prefixes.drop(replica)
        self._resets.pop(replica, None)
        self._speeds.pop((replica, "prefill"), None)
        self._speeds.pop((replica, "decode"), None)
        for call_id in rep.work:
            where = self._where.pop(call_id, None)
            if where is not None:
                self._forget(where[1])
            self._band.pop(call_id, None)
        return list(rep.work)

    def observe_prefill(self, replica: str, uncached_tokens: int, ttft_s: float | None) -> None:
        """A finished call's first token: how fast the replica prefills
        (`ReplicaView.prefill_tokens_per_s`), the 0.9 quantile of its last `PREFILL_SAMPLES`
        calls with at least `MIN_PREFILL_TOKENS` to prefill (a first token also waits for the
        engine's queue and a decode step, which only slow it: the fast ones say the speed)."""
        if ttft_s is None or ttft_s <= 0 or uncached_tokens < MIN_PREFILL_TOKENS:
            return
        self._speed(replica, "prefill", uncached_tokens / ttft_s, 0.9)

    def observe_decode(
        self, replica: str, output_tokens: int, latency_s: float, ttft_s: float | None
    ) -> None:
        """A finished call's tokens after its first: the replica's decode pace under the
        batches it runs (`ReplicaView.decode_s_per_token`), the median of its last
        `PREFILL_SAMPLES` calls with at least `MIN_DECODE_TOKENS` tokens. With the prefill
        speed it is what a service time is composed from on a device the predictor never saw
        (`swarmx.models.compose`)."""
        if ttft_s is None or output_tokens < MIN_DECODE_TOKENS or latency_s <= ttft_s:
            return
        self._speed(replica, "decode", (latency_s - ttft_s) / (output_tokens - 1), 0.5)

    def _speed(self, replica: str, kind: str, sample: float, level: float) -> None:
        rep = self.replicas.get(replica)
        if rep is None:
            return
        seen = self._speeds.setdefault((replica, kind), deque(maxlen=PREFILL_SAMPLES))
        seen.append(sample)
        value = quantile(sorted(seen), level)
        view = rep.view
        if kind == "prefill" and value != view.prefill_tokens_per_s:
            rep.view = dataclasses.replace(view, prefill_tokens_per_s=value)
        elif kind == "decode" and value != view.decode_s_per_token:
            rep.view = dataclasses.replace(view, decode_s_per_token=value)
        if rep.view is not view:
            self._refresh(rep)

    def set_external(self, replica: str, calls: int) -> None:
        """Calls on the replica's engine that are not this scheduler's, as its node last said
        (`ReplicaView.external`): the routers weigh them; admission does not (the node's
        slots are this scheduler's alone)."""
        rep = self.replicas.get(replica)
        if rep is None or rep.view.external == calls:
            return
        rep.view = dataclasses.replace(rep.view, external=calls)
        self._refresh(rep)

    def engine_cache(
        self, replica: str, removed: Sequence[int], resets: int, capacity_tokens: int | None
    ) -> None:
        """What the replica's engine said of its prefix cache (`ReplicaRuntime.cache_removed`
        and the rest): the index drops the blocks it evicted, starts over when its count of
        clears changes, and takes its size. Idempotent: the same report twice does nothing
        more."""
        rep = self.replicas.get(replica)
        if rep is None:
            return
        if capacity_tokens and capacity_tokens != rep.view.kv_cache_tokens:
            rep.view = dataclasses.replace(rep.view, kv_cache_tokens=capacity_tokens)
            self._refresh(rep)
        index = self.prefixes.get(replica)
        if self._resets.get(replica, 0) != resets:
            self._resets[replica] = resets
            if index is not None:
                index.clear()
        if index is not None and removed:
            index.remove(removed)

    def set_live(self, replica: str, live: bool, now_s: float) -> list[Assign]:
        """Stale nodes get nothing new; their outstanding calls stay booked to them."""
        rep = self.replicas.get(replica)
        if rep is None or rep.live == live:
            return []
        rep.live = live
        self._taking[rep.view.model] += 1 if live else -1
        self._refresh(rep)
        return self._drain(rep.view.model, now_s) if live else []

    def _unindex(self, view: ReplicaView) -> None:
        names = self._by_node.get(view.node, {})
        names.pop(view.replica, None)
        if not names:
            self._by_node.pop(view.node, None)
        self._models[view.model] -= 1
        if self._models[view.model] <= 0:
            del self._models[view.model]

    def view(self, replica: str) -> ReplicaView | None:
        rep = self.replicas.get(replica)
        return None if rep is None else rep.current()

    def node_views(self, node: str) -> list[ReplicaView]:
        """A node's replicas, found without a scan of the others."""
        return [self.replicas[r].current() for r in self._by_node.get(node, {})]

    def models(self) -> set[str]:
        """The models some replica serves."""
        return set(self._models)

    def live_replicas(self, model: str) -> int:
        """Replicas of ``model`` that take new calls (their node live, not draining)."""
        return self._taking[model]

    def views(self, model: str | None = None) -> list[ReplicaView]:
        return [
            r.current() for r in self.replicas.values() if model is None or r.view.model == model
        ]

    # --- calls ------------------------------------------------------------------------------

    def submit(self, ticket: Ticket, now_s: float) -> list[Assign]:
        """A call is ready. Call ids are unique (the engine's ``wf:step:index:attempt``): one
        already queued or running is refused."""
        call = ticket.call
        if call.call_id in self._waiting or call.call_id in self._where:
            raise ValueError(f"call {call.call_id} is already queued or running")
        model = pool_of(call)
        self.pools.setdefault(model, PoolStats()).arrivals += 1
        entry = (self._key(ticket), next(self._seq), ticket)
        heapq.heappush(self._queues.setdefault(model, []), entry)
        self._waiting[call.call_id] = entry
        self._live[model] = self._live.get(model, 0) + 1
        self._by_workflow.setdefault(call.workflow_id, {})[call.call_id] = None
        if ticket.deadline_s is not None:
            self._budgets.setdefault(model, _MinBag()).add(ticket.deadline_s - ticket.arrived_s)
        return self._drain(model, now_s)

    def finished(self, call_id: str, now_s: float) -> list[Assign]:
        """A call ended (any outcome): its slot frees and queued calls of that model may go."""
        where = self._where.pop(call_id, None)
        if where is None:
            return []
        self._forget(where[1])
        rep = self.replicas.get(where[0])
        if rep is None:
            return []
        work = rep.work.pop(call_id, None)
        placed = self._band.pop(call_id, None)
        if work is not None and placed is not None and placed[1] > 0:
            stats = self.pools.setdefault(rep.view.model, PoolStats())
            ratios = stats.slowdown.setdefault(placed[0], deque(maxlen=MIX_CALLS))
            ratios.append((now_s - work.dispatched_s) / placed[1])
        self._refresh(rep)
        return self._drain(rep.view.model, now_s)

    def cancel(self, call_ids: Sequence[str], now_s: float) -> list[Assign]:
        """Drop calls, queued or assigned; frees their slots. Costs O(log n) per call in the
        calls queued (amortized): a queued call is only marked gone (see ``_queues``)."""
        models: set[str] = set()
        for call_id in dict.fromkeys(call_ids):
            self._band.pop(call_id, None)
            if call_id in self._waiting:
                self._unqueue(call_id)
                continue
            where = self._where.pop(call_id, None)
            if where is None:
                continue
            self._forget(where[1])
            rep = self.replicas.get(where[0])
            if rep is not None:
                rep.work.pop(call_id, None)
                self._refresh(rep)
                models.add(rep.view.model)
        out: list[Assign] = []
        for model in models:
            out += self._drain(model, now_s)
        return out

    def cancel_workflow(self, workflow_id: str, now_s: float) -> list[Assign]:
        """Drop a workflow's calls, queued or assigned (`cancel`), found through an index by
        workflow: the cost is that workflow's calls, not the queue's."""
        calls = self._by_workflow.get(workflow_id)
        return self.cancel(list(calls), now_s) if calls else []

    def queued(self, model: str | None = None) -> int:
        if model is not None:
            return self._live.get(model, 0)
        return sum(self._live.values())

    def queued_models(self) -> list[str]:
        """The models with calls waiting: what a periodic view needs, without `queued_tickets`'
        sort of every queued call."""
        return [model for model, n in self._live.items() if n]

    def queued_tickets(self) -> list[Ticket]:
        """The waiting calls per model in queue order: O(n log n), for views, never per call."""
        return [e[2] for q in self._queues.values() for e in sorted(q) if self._is_live(e)]

    def budget_s(self, pool: str) -> float | None:
        """The tightest time allowed (deadline - arrival) to this pool's calls waiting or
        running: the latency target a scaler sizes the pool for; None without deadlines."""
        bag = self._budgets.get(pool)
        least = bag.least() if bag is not None else None
        return None if least is None else max(least, 1e-3)

    # --- internals --------------------------------------------------------------------------

    def _key(self, t: Ticket) -> float:
        if self.order == "slack" and t.slack_s is not None:
            return t.arrived_s + t.slack_s
        if self.order == "slack":
            return math.inf  # no deadline: after every call that has one, FIFO among themselves
        return t.arrived_s

    def _refresh(self, rep: _Replica) -> None:
        rep.changed()
        open_ = self._open.get(rep.view.model)
        if open_ is None:
            open_ = self._open[rep.view.model] = _OpenSet()
        if rep.live and len(rep.work) < rep.view.concurrency + self.replica_queue:
            open_.put(rep.current())
        else:
            open_.drop(rep.view.replica)

    def _drop_open(self, view: ReplicaView) -> None:
        open_ = self._open.get(view.model)
        if open_ is not None:
            open_.drop(view.replica)

    def _is_live(self, entry: tuple[float, int, Ticket]) -> bool:
        return self._waiting.get(entry[2].call.call_id) is entry

    def _unqueue(self, call_id: str) -> None:
        """A queued call is cancelled: its entry is marked gone, and the heap rebuilt once
        gone entries outnumber live ones (so each cancel costs O(1) amortized)."""
        ticket = self._waiting.pop(call_id)[2]
        self._forget(ticket)
        model = pool_of(ticket.call)
        live = self._live[model] = self._live[model] - 1
        queue = self._queues[model]
        if len(queue) - live > live:
            queue[:] = [e for e in queue if self._is_live(e)]
            heapq.heapify(queue)

    def _forget(self, ticket: Ticket) -> None:
        """A call leaves the dispatcher (cancelled, finished, its replica gone)."""
        call = ticket.call
        calls = self._by_workflow.get(call.workflow_id)
        if calls is not None:
            calls.pop(call.call_id, None)
            if not calls:
                del self._by_workflow[call.workflow_id]
        if ticket.deadline_s is not None:
            self._budgets[pool_of(call)].remove(ticket.deadline_s - ticket.arrived_s)

    def _drain(self, model: str, now_s: float) -> list[Assign]:
        """Queued calls onto open replicas, in queue order, while both last. Where the
        forecaster is asked per candidate, the calls sure to be placed (no more than the open
        replicas have room for: each call placed takes one place) are handed to it together
        first (`Forecaster.prepare`), so their own part of the forecast is worked out in one
        batch."""
        out: list[Assign] = []
        open_ = self._open.get(model)
        if not open_ or not self._live.get(model):
            return out
        queue = self._queues[model]
        fc = self.forecaster
        batch = fc is not None and self.router.forecast == "service"
        while self._live[model] and open_:
            size = self._room(open_, min(PREPARE_BATCH, self._live[model])) if batch else 1
            tickets = self._pop_live(model, queue, size)
            if len(tickets) > 1:
                assert fc is not None
                fc.prepare([t.call for t in tickets])
            for ticket in tickets:  # each one leaves room (see above) for the next
                out.append(self._assign(ticket, self._candidates(open_), now_s))
        if not self._live[model]:
            queue.clear()  # only cancelled entries are left
        return out

    def _room(self, open_: _OpenSet, most: int) -> int:
        """Calls the open replicas can take before they close, counted up to ``most``."""
        room, extra = 0, self.replica_queue
        for name in open_.names():
            rep = self.replicas[name]
            room += rep.view.concurrency + extra - len(rep.work)
            if room >= most:
                return most
        return max(room, 1)

    def _pop_live(
        self, model: str, queue: list[tuple[float, int, Ticket]], most: int
    ) -> list[Ticket]:
        """Up to ``most`` calls off the front of the queue, skipping those cancelled there."""
        out: list[Ticket] = []
        while len(out) < most and self._live[model]:
            entry = heapq.heappop(queue)
            if not self._is_live(entry):
                continue  # cancelled while queued
            ticket = entry[2]
            del self._waiting[ticket.call.call_id]
            self._live[model] -= 1
            out.append(ticket)
        return out

    def _candidates(self, open_: _OpenSet) -> list[ReplicaView]:
        if self.router.forecast != "none" and len(open_) > self.max_candidates:
            return open_.least_loaded(self.max_candidates)
        return open_.all()

    def _assign(self, ticket: Ticket, cands: list[ReplicaView], now_s: float) -> Assign:
        call, fc, kind = ticket.call, self.forecaster, self.router.forecast
        forecasts: list[LatencyDist] | None = None
        wants = self.router.uses_prefix or (fc is not None and kind == "service")
        cached = self._cached(call, cands) if wants else None
        if fc is not None and kind == "service":
            forecasts = fc.service(call, cands, cached)
        elif fc is not None and kind == "load_only":
            forecasts = fc.load_only(call, cands)
        evicted = self._evicted(call, cands, cached, now_s) if self.router.uses_evictions else None
        decision = self.router.choose(
            RouteInput(call, cands, now_s, forecasts, ticket.deadline_s, cached, evicted)
        )
        chosen = cands[decision.index]
        service: LatencyDist | None = None
        if fc is not None:  # the full forecast on the chosen replica is recorded, whatever ranked
            service = forecasts[decision.index] if forecasts and kind == "service" else None
            own = None if cached is None else [cached[decision.index]]
            service = service or fc.service(call, [chosen], own)[0]
        rep = self.replicas[chosen.replica]
        if service is not None:
            self._note_service(pool_of(call), service)
            if ticket.deadline_s is not None:
                self._note_risk(pool_of(call), decision.completion or service, ticket, now_s)
            occupancy = len(rep.work) / max(1, chosen.concurrency)
            band = min(LOAD_BANDS - 1, int(occupancy * LOAD_BANDS))
            self._band[call.call_id] = (band, service.quantile(0.5))
        blocks, per = call.prefix_blocks, call.block_tokens
        rep.work[call.call_id] = Work(call.call_id, now_s, service, len(blocks) * per)
        held: int | None = None
        if blocks and per > 0:
            capacity = chosen.kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS
            index = self.prefixes.ensure(chosen.replica, capacity // per)
            held = cached[decision.index] if cached is not None else index.match(blocks) * per
            last_s = index.last_used_s(blocks[held // per - 1]) if held >= per else None
            if last_s is not None:
                self.reuse.observe(now_s - last_s)
            index.insert(blocks, now_s)
            if chosen.prefill_tokens_per_s > 0:
                prefill_s = (len(blocks) * per - held) / chosen.prefill_tokens_per_s
                rep.duty = rep.duty.plus(prefill_s, now_s)
        self._refresh(rep)
        self._where[call.call_id] = (chosen.replica, ticket)
        return Assign(ticket, chosen, service, decision.completion, held)

    def _cached(self, call: CallSpec, cands: Sequence[ReplicaView]) -> list[int] | None:
        """Prompt tokens of ``call`` each candidate holds, by the prefix index."""
        blocks = call.prefix_blocks
        if not blocks or call.block_tokens < 1:
            return None
        per = call.block_tokens
        return [self.prefixes.cached_blocks(v.replica, blocks) * per for v in cands]

    def _evicted(
        self,
        call: CallSpec,
        cands: Sequence[ReplicaView],
        cached: Sequence[int] | None,
        now_s: float,
    ) -> list[int] | None:
        """Prompt tokens of prefixes still wanted (used within the reuse horizon) that taking
        ``call`` would evict from each candidate's cache, by the prefix index."""
        if cached is None:
            return None
        blocks, per = call.prefix_blocks, call.block_tokens
        since_s = now_s - self.reuse.horizon_s
        out = []
        for view in cands:
            index = self.prefixes.get(view.replica)
            out.append(0 if index is None else index.evicts_used_since(blocks, since_s) * per)
        return out

    def _note_service(self, model: str, dist: LatencyDist) -> None:
        stats = self.pools.setdefault(model, PoolStats())
        if stats.service is None:
            stats.service = ServiceMix(dist.levels)
        stats.service.add(dist)

    def _note_risk(self, model: str, done: LatencyDist, ticket: Ticket, now_s: float) -> None:
        assert ticket.deadline_s is not None
        left_s = ticket.deadline_s - now_s
        stats = self.pools.setdefault(model, PoolStats())
        stats.missed += 1.0 - tailmath.cdf(done, left_s) if left_s > 0 else 1.0
        stats.with_deadline += 1

    def take_risk(self, model: str) -> float | None:
        """The mean predicted chance that the calls of ``model`` placed since the last call of
        this miss their deadlines, as forecast where they were placed (their wait in the queue
        and the replica they got included); None if none had a deadline. The tail scaler's
        measure of tail risk against the SLO."""
        stats = self.pools.setdefault(model, PoolStats())
        if not stats.with_deadline:
            return None
        risk = stats.missed / stats.with_deadline
        stats.missed, stats.with_deadline = 0.0, 0
        return risk

    def typical_service(self, model: str) -> LatencyDist | None:
        """The recent forecasts of this model's calls, as one distribution (their mixture)."""
        stats = self.pools.get(model)
        return None if stats is None or stats.service is None else stats.service.dist()

    def service_by_load(self, model: str) -> list[tuple[float, LatencyDist]]:
        """(occupancy, the typical service there) per `LOAD_BANDS` band with enough calls, the
        band's middle as its occupancy: the forecast mixture times what calls placed at that
        occupancy actually took over their forecasts, on average, and never less than at an
        emptier band. A fuller replica does not serve faster; where the ratios say so (a call
        mix that differs by load, few calls), trusting them would make the emptiest pool look
        slowest and the tail scaler ask for every replica it may have."""
        stats = self.pools.get(model)
        if stats is None or stats.service is None:
            return []
        typical = stats.service.dist()
        out: list[tuple[float, LatencyDist]] = []
        factor = 0.0
        for band, ratios in sorted(stats.slowdown.items()):
            if len(ratios) >= MIN_BAND_CALLS:
                factor = max(factor, sum(ratios) / len(ratios))
                scaled = tuple(v * factor for v in typical.values_s)
                out.append(((band + 0.5) / LOAD_BANDS, LatencyDist(typical.levels, scaled)))
        return out

    def take_arrivals(self, model: str) -> int:
        """Calls of ``model`` that arrived since the last call of this (for the scaler)."""
        stats = self.pools.setdefault(model, PoolStats())
        n, stats.arrivals = stats.arrivals, 0
        return n
