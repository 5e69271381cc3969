"""``serve --aio``: the same servicers on grpc.aio's event loop, in a thread of its own.

The thread-pool server hands every call from gRPC's poller thread to a worker thread and back;
with a one-image request that hand-off, and the GIL trading between the threads, costs more
than the request's own work (README, section 6). Here a call's short parts (parsing, the key,
the model, the answer policy, the watermark, the monitor's computing) run on the event loop
itself. The parts that may wait or run long (common.steps.Blocking: a log commit, a client's
state to load, a request above ``small_request_items`` images) go to a thread pool of
``workers`` threads; the reply of a monitor in another process (common.steps.Waiting) is a
future the loop awaits, with no thread of its own.

Only the transport differs: the servicers, the data plane and the errors-to-codes mapping
(servicer.STATUS_OF) are the thread-pool server's.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc

from common.steps import run_steps_async
from service.servicer import AuthInterceptor, parse_request


class _Abort(Exception):
    """A servicer's ``context.abort`` on the event loop (raised in the servicer's code, turned
    into the aio context's abort by the handler)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class LoopContext:
    """What the servicers use of a ``grpc.ServicerContext``, for a call on the event loop:
    ``abort`` raises (as grpc's thread-pool context does) instead of being a coroutine."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: grpc.aio.ServicerContext):
        self._ctx = ctx

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    def peer(self) -> str:
        return self._ctx.peer()

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)


def handler_maker(executor: futures.Executor):
    """A ``handler_for`` for servicer.raw_method_handlers: methods a servicer writes as steps
    (its ``STEPS``) run on the loop with their Blocking parts in ``executor``; the others (live,
    ready, metadata: no waits) run on the loop."""

    def handler_for(servicer, name: str, req_cls, method: str, metrics):
        steps_name = getattr(servicer, "STEPS", {}).get(name)
        steps = None if steps_name is None else getattr(servicer, steps_name)
        fn = getattr(servicer, name)

        async def handler(raw, context):
            ctx = LoopContext(context)
            try:
                request = parse_request(raw, req_cls, method, metrics, ctx)
                if steps is None:
                    return fn(request, ctx)
                return await run_steps_async(steps(request, ctx), executor)
            except _Abort as abort:
                await context.abort(abort.code, abort.details)
        return handler
    return handler_for


class LoopAuthInterceptor(grpc.aio.ServerInterceptor):
    """servicer.AuthInterceptor's check, for the event loop's server."""

    def __init__(self, auth: AuthInterceptor):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        message = self.auth.rejection(handler_call_details)
        if message is None:
            return await continuation(handler_call_details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny)


class LoopServer:
    """A grpc.aio server on an event loop in a thread of its own, driven from other threads
    (service.server.Server's start/stop/health calls are synchronous)."""

    def __init__(self, options, auth: AuthInterceptor, workers: int):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpc-aio-loop", daemon=True)
        self._thread.start()
        self.executor = futures.ThreadPoolExecutor(max_workers=workers,
                                                   thread_name_prefix="aio-blocking")

        async def make():
            return grpc.aio.server(options=options, interceptors=[LoopAuthInterceptor(auth)])

        self.server = self.call(make())

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout: float | None = 30.0):
        """Run ``coro`` on the loop and wait for its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def handler_for(self):
        return handler_maker(self.executor)

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace: float | None) -> None:
        """Stop taking calls, let those in flight finish within ``grace`` seconds, then stop
        the loop and the thread pool."""
        try:
            self.call(self.server.stop(grace), timeout=None if grace is None else grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.executor.shutdown(wait=True)
            if not self._thread.is_alive():
                self.loop.close()
