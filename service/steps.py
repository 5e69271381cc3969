"""A prediction as steps, so one handler body serves a thread pool and an event loop.

The data plane and the servicers write a prediction as a generator. Wherever a part may wait
(on the monitor's log, on a monitor in another process, on a client's state being loaded) or
runs long (a large batch, which should use a second core), it yields ``Blocking(fn, *args)``
and receives ``fn(*args)``'s value back (or its exception, thrown in at the ``yield``).
Everything between the yields is short computation.

* :func:`run_steps` drives it on the calling thread: each ``Blocking`` is simply called. This is
  how the thread-pool server and every in-process caller run a prediction; behaviour is that of
  plain blocking code.
* :func:`run_steps_async` drives it on an asyncio event loop (``serve --aio``): the short parts
  run on the loop itself, with no hand-off to another thread, and only the ``Blocking`` parts go
  to an executor. On CPython that hand-off, and the GIL trading between the threads it needs,
  is most of what a thread-pool server spends on a one-image request (README, section 6).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Generator

Steps = Generator["Blocking", Any, Any]


class Blocking:
    """A part of a prediction that may wait or run long: ``fn(*args)``, off the event loop."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, *args):
        self.fn = fn
        self.args = args

    def __repr__(self) -> str:
        return f"Blocking({getattr(self.fn, '__qualname__', self.fn)!r})"


def run_steps(steps: Steps):
    """Run a prediction's steps on this thread; returns the generator's value."""
    value, error = None, None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = step.fn(*step.args), None
        except Exception as exc:  # noqa: BLE001 - thrown into the generator, which decides
            value, error = None, exc


async def run_steps_async(steps: Steps, executor):
    """Run a prediction's steps on the running event loop, each ``Blocking`` part in
    ``executor`` (a concurrent.futures executor); returns the generator's value."""
    loop = asyncio.get_running_loop()
    value, error = None, None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = await loop.run_in_executor(executor, step.fn, *step.args), None
        except Exception as exc:  # noqa: BLE001 - thrown into the generator, which decides
            value, error = None, exc
