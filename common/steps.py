"""A request as steps, so one body of code serves a thread pool and an event loop.

The data plane, the servicers and the monitors write a request as a generator. Wherever a part
may wait or runs long it yields a step and receives the step's value back (or its exception,
thrown in at the ``yield``); everything between the yields is short computation.

* ``Blocking(fn, *args)``: a call that may wait on a lock, a disk or a condition, or that runs
  long (a large batch, which should use a second core).
* ``Waiting(future, timeout, on_timeout)``: a reply another thread will deliver (a
  ``concurrent.futures.Future``, e.g. a monitor's answer read off its connection).

:func:`run_steps` drives a generator on the calling thread: a Blocking step is called, a Waiting
step blocks on its future; that is plain blocking code, as the thread-pool server and every
in-process caller run it. :func:`run_steps_async` drives it on an asyncio event loop
(``serve --aio``): the short parts run on the loop itself, Blocking steps go to an executor and
Waiting steps are awaited without any thread of their own. On CPython the hand-offs between
threads, and the GIL trading they cause, are most of what a thread-pool server spends on a
one-image request (README, section 6).
"""
from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any, Callable, Generator

Steps = Generator["Blocking | Waiting", Any, Any]


class Blocking:
    """A part of a request that may wait or run long: ``fn(*args)``, off the event loop."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, *args):
        self.fn = fn
        self.args = args

    def run(self):
        return self.fn(*self.args)

    async def run_async(self, executor):
        return await asyncio.get_running_loop().run_in_executor(executor, self.fn, *self.args)

    def __repr__(self) -> str:
        return f"Blocking({getattr(self.fn, '__qualname__', self.fn)!r})"


class Waiting:
    """A reply another thread delivers through ``future``; after ``timeout`` seconds without it,
    ``on_timeout()`` (an exception) is raised instead."""

    __slots__ = ("future", "timeout", "on_timeout")

    def __init__(self, future: futures.Future, timeout: float,
                 on_timeout: Callable[[], BaseException]):
        self.future, self.timeout, self.on_timeout = future, timeout, on_timeout

    def run(self):
        try:
            return self.future.result(self.timeout)
        except futures.TimeoutError:
            raise self.on_timeout() from None

    async def run_async(self, executor):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.future), self.timeout)
        except asyncio.TimeoutError:
            raise self.on_timeout() from None


def advance(steps: Steps, value=None, error: Exception | None = None) -> tuple[bool, object]:
    """Send ``value`` (or throw ``error``) into ``steps``: (True, the generator's value) when it
    finished, else (False, its next step). The one place the drivers below move a request."""
    try:
        return False, (steps.send(value) if error is None else steps.throw(error))
    except StopIteration as stop:
        return True, stop.value


def run_steps(steps: Steps):
    """Run a request's steps on this thread; returns the generator's value."""
    value, error = None, None
    while True:
        done, step = advance(steps, value, error)
        if done:
            return step
        try:
            value, error = step.run(), None
        except Exception as exc:  # noqa: BLE001 - thrown into the generator, which decides
            value, error = None, exc


async def run_steps_async(steps: Steps, executor):
    """Run a request's steps on the running event loop, Blocking steps in ``executor`` (a
    concurrent.futures executor); returns the generator's value."""
    value, error = None, None
    while True:
        done, step = advance(steps, value, error)
        if done:
            return step
        try:
            value, error = await step.run_async(executor), None
        except Exception as exc:  # noqa: BLE001 - thrown into the generator, which decides
            value, error = None, exc


def rest_of_steps(steps: Steps, first) -> Steps:
    """The steps of ``steps`` from its ``first`` one on (taken out by :func:`advance`, for a
    caller that must leave a critical section before anything waits: a lock held across a
    yield would be held by a suspended request): yields each, sends its value (or throws its
    error) back, returns the generator's value."""
    done, step = False, first
    while not done:
        try:
            value, error = (yield step), None
        except Exception as exc:  # noqa: BLE001 - thrown into the generator, which decides
            value, error = None, exc
        done, step = advance(steps, value, error)
    return step


def call_steps(fn: Callable, *args) -> Steps:
    """``fn(*args)`` as steps of one Blocking step (for code that has no steps of its own)."""
    return (yield Blocking(fn, *args))
