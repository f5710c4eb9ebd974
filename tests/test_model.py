"""Model-based tests: random programs checked against a reference model.

A program is a tree of operations -- nested ``run``, ``exit``, ``scope``,
``enter_with``, a plain ``ContextVar.set``, spawns on every gevent path
(``gevent.spawn``, ``spawn_later``, ``Greenlet(...).start()``, ``spawn_raw``,
``Pool.spawn``, ``Group.spawn``, ``ThreadPoolExecutor.submit``,
``ThreadPool.spawn``, ``link``/``link_value``/``rawlink`` callbacks), bound
functions, snapshots and ``AsyncResource``, sleeps and kills -- with
observation points that record what the code sees there.

The reference model is small:

* a spawn, submit or link captures the spawner's current bindings at that
  moment (for ``Greenlet(...).start()``: at ``start()``), as do ``bind``,
  ``snapshot`` and ``AsyncResource`` at construction;
* ``run`` and ``exit`` nest: inside, one storage changes; afterwards the
  whole frame is as before;
* ``scope`` restores its own storage when the block ends, and nothing else;
* ``enter_with`` and ``ContextVar.set`` change the current frame only;
* a greenlet killed while suspended unwinds to its own spawn-time bindings;
  one killed before it started never runs.

Every observation point the model says is reached must be reached exactly
once, with exactly the model's bindings; no other point may be reached.
Programs come from a seeded generator (hypothesis draws the seed and the
size, ``derandomize=True``, so CI runs the same programs every time).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

import gevent
import gevent.pool
import gevent.threadpool
import pytest
from gevent import Greenlet, GreenletExit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asl_gevent import AsyncLocalStorage, AsyncResource

A: AsyncLocalStorage[str] = AsyncLocalStorage(name="model-a")
B: AsyncLocalStorage[str] = AsyncLocalStorage(name="model-b", default="b-default")
VAR: ContextVar[str] = ContextVar("model_var", default="var-unset")
STORAGES = (A, B)
DEFAULTS = (None, "b-default")

#: (A's store, B's store, VAR) as one greenlet/thread/callback sees them.
State = tuple[Optional[str], Optional[str], str]
Op = tuple[Any, ...]
Block = list[Op]


def observe() -> State:
    return A.get_store(), B.get_store(), VAR.get()


def _with(state: State, index: int, value: Optional[str]) -> State:
    return (value, state[1], state[2]) if index == 0 else (state[0], value, state[2])


# -- where ops may run ---------------------------------------------------------------
#
# "greenlet": anything. "hub": a rawlink callback runs in the hub, which must
# not block (no sleep, kill, ThreadPool.spawn). "thread": an executor or
# ThreadPool task runs in a real OS thread with no hub (no gevent at all).

SPAWNS = {
    "greenlet": ["spawn", "spawn_later", "spawn_raw", "Pool.spawn", "Group.spawn",
                 "executor", "threadpool"],
    "hub": ["spawn", "spawn_later", "spawn_raw", "Pool.spawn", "Group.spawn", "executor"],
    "thread": ["executor"],
}
CHILD_MODE = {"executor": "thread", "threadpool": "thread"}
LINKS = ["link", "link_value", "rawlink"]
BOUND = ["bind", "snapshot", "AsyncResource", "AsyncResource.bind"]

LEAVES = ["observe", "enter", "setvar"]
NESTS = ["run", "exit", "scope"]
#: op -> weight, per mode
WEIGHTS = {
    "greenlet": {"observe": 24, "enter": 8, "setvar": 5, "run": 10, "exit": 4, "scope": 6,
                 "spawn": 18, "start": 4, "link": 7, "bound": 4, "sleep": 7, "kill": 3},
    "hub": {"observe": 30, "enter": 8, "setvar": 5, "run": 10, "exit": 4, "scope": 6,
            "spawn": 14, "start": 4, "link": 5, "bound": 4},
    "thread": {"observe": 34, "enter": 10, "setvar": 6, "run": 12, "exit": 5, "scope": 8,
               "spawn": 6, "bound": 4},
}
MAX_DEPTH = 7


class Generator:
    """Seeded random programs of about *budget* operations."""

    def __init__(self, seed: int, budget: int) -> None:
        self.rng = random.Random(seed)
        self.budget = budget
        self.ops = 0
        self.ids = itertools.count()

    def value(self) -> str:
        return f"v{next(self.ids)}"

    def program(self) -> Block:
        block: Block = []
        while self.ops < self.budget:
            block.extend(self.block("greenlet", 0, self.budget - self.ops))
        return block

    def block(self, mode: str, depth: int, length: int) -> Block:
        return [op for _ in range(length) if self.ops < self.budget
                for op in [self.op(mode, depth)]]

    def sub(self, mode: str, depth: int) -> Block:
        return self.block(mode, depth + 1, self.rng.randint(0, 5))

    def frame_ops(self) -> Block:
        """Ops that only change the current frame (between capture and use)."""
        return [self.op_leaf(self.rng.choice(LEAVES)) for _ in range(self.rng.randint(0, 2))]

    def op_leaf(self, kind: str) -> Op:
        self.ops += 1
        if kind == "observe":
            return ("observe", next(self.ids))
        if kind == "enter":
            return ("enter", self.rng.randrange(2), self.value())
        return ("setvar", self.value())

    def op(self, mode: str, depth: int) -> Op:
        weights = WEIGHTS[mode]
        kinds = list(weights) if depth < MAX_DEPTH else LEAVES
        kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        if kind in LEAVES:
            return self.op_leaf(kind)
        self.ops += 1
        rng = self.rng
        if kind == "run":
            return ("run", rng.randrange(2), self.value(), self.sub(mode, depth))
        if kind == "exit":
            return ("exit", rng.randrange(2), self.sub(mode, depth))
        if kind == "scope":
            return ("scope", rng.randrange(2), self.value(), self.sub(mode, depth))
        if kind == "spawn":
            path = rng.choice(SPAWNS[mode])
            return ("spawn", path, self.sub(CHILD_MODE.get(path, "greenlet"), depth))
        if kind == "start":
            return ("start", self.sub("greenlet", depth), self.frame_ops())
        if kind == "link":
            how = rng.choice(LINKS)
            body_mode = "hub" if how == "rawlink" else "greenlet"
            return ("link", how, rng.choice([0, 0.001]), self.sub(body_mode, depth),
                    self.frame_ops())
        if kind == "bound":
            return ("bound", rng.choice(BOUND), self.sub(mode, depth), self.frame_ops())
        if kind == "sleep":
            return ("sleep", rng.choice([0, 0, 0.001]))
        assert kind == "kill"
        inner = [self.op_leaf(rng.choice(LEAVES)) for _ in range(rng.randint(1, 3))]
        return ("kill", rng.choice(["running", "before start"]), rng.randrange(2),
                self.value(), inner, next(self.ids), next(self.ids))


# -- the reference model --------------------------------------------------------------


def model(block: Block, state: State, expected: dict[int, State]) -> State:
    """Fill *expected* with what each reached observation point must see;
    return the frame's bindings after *block*."""
    for op in block:
        kind = op[0]
        if kind == "observe":
            expected[op[1]] = state
        elif kind == "enter":
            state = _with(state, op[1], op[2])
        elif kind == "setvar":
            state = (state[0], state[1], op[1])
        elif kind == "run":
            model(op[3], _with(state, op[1], op[2]), expected)
        elif kind == "exit":
            model(op[2], _with(state, op[1], DEFAULTS[op[1]]), expected)
        elif kind == "scope":
            after = model(op[3], _with(state, op[1], op[2]), expected)
            state = _with(after, op[1], state[op[1]])
        elif kind == "spawn":
            model(op[2], state, expected)
        elif kind == "start":
            state = model(op[2], state, expected)  # frame ops run before start()
            model(op[1], state, expected)
        elif kind in ("link", "bound"):
            captured = state
            state = model(op[-1], state, expected)  # frame ops run after capture
            model(op[-2], captured, expected)
        elif kind == "kill":
            _, when, index, value, inner, handler_id, link_id = op
            expected[link_id] = state
            if when == "running":
                model(inner, _with(state, index, value), expected)
                expected[handler_id] = state
        else:
            assert kind == "sleep", kind
    return state


# -- the real thing ----------------------------------------------------------------------


#: Shared by every program of the module, so workers started during one
#: program (or one part of it) serve the others: made by ``_pools``.
POOLS: dict[str, Any] = {}


class Interpreter:
    """Runs a program for real and records every observation point reached."""

    def __init__(self) -> None:
        self.observed: list[tuple[int, State]] = []
        self.errors: list[BaseException] = []
        self.pending = 0
        self.lock = threading.Lock()

    def unit(self, block: Block, mode: str) -> Callable[..., None]:
        """*block* as a piece of work to hand to a spawn path; tracked until done."""
        with self.lock:
            self.pending += 1

        def body(*_: Any) -> None:
            try:
                self.execute(block, mode)
            except BaseException as exc:  # reported by the test, not the hub
                self.errors.append(exc)
            finally:
                with self.lock:
                    self.pending -= 1

        return body

    def spawn(self, path: str, block: Block) -> None:
        work = self.unit(block, CHILD_MODE.get(path, "greenlet"))
        if path == "spawn":
            gevent.spawn(work)
        elif path == "spawn_later":
            gevent.spawn_later(0.001, work)
        elif path == "spawn_raw":
            gevent.spawn_raw(work)
        elif path in ("Pool.spawn", "Group.spawn", "threadpool"):
            POOLS[path].spawn(work)
        else:
            assert path == "executor"
            POOLS[path].submit(work)

    def execute(self, block: Block, mode: str) -> None:
        for op in block:
            kind = op[0]
            if kind == "observe":
                self.observed.append((op[1], observe()))
            elif kind == "enter":
                STORAGES[op[1]].enter_with(op[2])
            elif kind == "setvar":
                VAR.set(op[1])
            elif kind == "run":
                STORAGES[op[1]].run(op[2], self.execute, op[3], mode)
            elif kind == "exit":
                STORAGES[op[1]].exit(self.execute, op[2], mode)
            elif kind == "scope":
                with STORAGES[op[1]].scope(op[2]):
                    self.execute(op[3], mode)
            elif kind == "spawn":
                self.spawn(op[1], op[2])
            elif kind == "start":
                g = Greenlet(self.unit(op[1], "greenlet"))
                self.execute(op[2], mode)
                g.start()
            elif kind == "link":
                _, how, delay, body, frame_ops = op
                target = gevent.spawn(gevent.sleep, delay)
                getattr(target, how)(self.unit(body, "hub" if how == "rawlink" else "greenlet"))
                self.execute(frame_ops, mode)
            elif kind == "bound":
                self.bound(op[1], op[2], op[3], mode)
            elif kind == "sleep":
                gevent.sleep(op[1])
            else:
                assert kind == "kill", kind
                self.kill(*op[1:])

    def bound(self, how: str, body: Block, frame_ops: Block, mode: str) -> None:
        if how == "bind":
            fn = AsyncLocalStorage.bind(self.execute)
            self.execute(frame_ops, mode)
            fn(body, mode)
        elif how == "snapshot":
            runner = AsyncLocalStorage.snapshot()
            self.execute(frame_ops, mode)
            runner(self.execute, body, mode)
        elif how == "AsyncResource":
            resource = AsyncResource("Model")
            self.execute(frame_ops, mode)
            resource.run_in_async_scope(self.execute, body, mode)
        else:
            fn = AsyncResource("Model").bind(self.execute)
            self.execute(frame_ops, mode)
            fn(body, mode)

    def kill(self, when: str, index: int, value: str, inner: Block, handler_id: int,
             link_id: int) -> None:
        def suspended() -> None:
            self.execute(inner, "greenlet")
            gevent.sleep(30)

        def victim() -> None:
            try:
                STORAGES[index].run(value, suspended)
            except GreenletExit:
                self.observed.append((handler_id, observe()))
                raise

        g = gevent.spawn(victim)
        g.link(self.unit([("observe", link_id)], "greenlet"))
        if when == "running":
            gevent.sleep(0)  # the victim starts and suspends in its sleep
        g.kill(timeout=10)
        assert g.dead

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pending:
            assert time.monotonic() < deadline, f"{self.pending} units never finished"
            gevent.sleep(0.001)


def count_ops(block: Block) -> int:
    total = 0
    for op in block:
        total += 1
        for part in op[1:]:
            if isinstance(part, list):
                total += count_ops(part)
    return total


def check_program(seed: int, budget: int) -> int:
    """Run one generated program; assert it matches the model. Returns its size."""
    program = Generator(seed, budget).program()
    start = observe()
    expected: dict[int, State] = {}
    model(program, start, expected)

    interpreter = Interpreter()
    root = gevent.spawn(interpreter.execute, program, "greenlet")
    root.get(timeout=30)
    interpreter.wait()
    assert interpreter.errors == []

    seen: dict[int, State] = {}
    twice = []
    for oid, got in interpreter.observed:
        if oid in seen:
            twice.append(oid)
        seen[oid] = got
    assert twice == [], "observation points reached more than once"
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    assert (missing, unexpected) == ([], []), "lost or unexpected work"
    wrong = {oid: (seen[oid], want) for oid, want in expected.items() if seen[oid] != want}
    assert wrong == {}, "observed != model (got, want)"
    assert observe() == start
    return count_ops(program)


@pytest.fixture(autouse=True, scope="module")
def _pools() -> Iterator[None]:
    POOLS.update({
        "executor": ThreadPoolExecutor(max_workers=3),
        "threadpool": gevent.threadpool.ThreadPool(3),
        # Unbounded: a full pool would block, and rawlink callbacks (in the hub)
        # spawn into it too.
        "Pool.spawn": gevent.pool.Pool(),
        "Group.spawn": gevent.pool.Group(),
    })
    try:
        yield
    finally:
        POOLS.pop("executor").shutdown(wait=True)
        POOLS.pop("threadpool").kill()
        POOLS.clear()


_SETTINGS = dict(derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@settings(max_examples=300, **_SETTINGS)  # type: ignore[arg-type]
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(1, 40))
def test_small_programs_match_the_model(seed: int, budget: int) -> None:
    """Many small programs: every observation point sees what the model says."""
    check_program(seed, budget)


@pytest.mark.slow
@settings(max_examples=30, **_SETTINGS)  # type: ignore[arg-type]
@given(seed=st.integers(0, 2**32 - 1), budget=st.integers(1000, 10_000))
def test_large_programs_match_the_model(seed: int, budget: int) -> None:
    """30 programs of 1,000 to 10,000 operations (spawns inside spawns inside
    callbacks inside threads), all in flight together, match the model."""
    assert check_program(seed, budget) >= 1000


def test_generator_covers_every_operation() -> None:
    """The generator really produces every op and every spawn/link/bound path
    (a model test that never spawns would prove nothing)."""
    seen: set[str] = set()

    def walk(block: Block) -> None:
        for op in block:
            seen.add(op[0])
            if op[0] in ("spawn", "link", "bound"):
                seen.add(f"{op[0]}:{op[1]}")
            if op[0] == "kill":
                seen.add(f"kill:{op[1]}")
            for part in op[1:]:
                if isinstance(part, list):
                    walk(part)

    for seed in range(3):
        walk(Generator(seed, 1200).program())
    wanted = {*LEAVES, *NESTS, "start", "sleep", "kill:running", "kill:before start",
              *(f"spawn:{p}" for p in SPAWNS["greenlet"]), *(f"link:{h}" for h in LINKS),
              *(f"bound:{b}" for b in BOUND)}
    assert wanted <= seen, wanted - seen
