"""Client processes for the wire-speed benchmark.

A :class:`ClientPool` holds a few worker processes (spawned, so no state is shared with the
parent; OMP/BLAS threads set to 1 before they start). Each worker drives its share of the clients
with ``grpc.aio``: one channel (its own TCP connection) and one API key per client, requests
serialized once up front and sent as raw bytes (``request_serializer=None``,
``response_deserializer=None``), so the client's protobuf cost is nil. Only a client's first
response is parsed (to check it holds N predictions of 10 probabilities when probabilities are
sent) and its last (to report the answer kind the server ended up giving it).

Timing uses ``time.monotonic`` (CLOCK_MONOTONIC, the same clock in every process on Linux): the
parent picks the start, the measurement window ``[m0, m1]``; a request counts when its response
arrives inside the window (so throughput is unbiased at the window's edges whatever the request
latency), and its latency is recorded. Every loop is bounded by a request count and a deadline.
"""
from __future__ import annotations

import os
import time
import traceback
from collections import Counter

H = W = 28
PREDICT = "/modelguard.v1.Inference/Predict"
MAX_MSG = 512 * H * W * 4 + 64 * 1024


# --- requests ------------------------------------------------------------------------------------
FORMATS = ("predictions", "packed")


def encode_request(images_u8, fmt: str = "predictions", request_id: str = "") -> bytes:
    """Serialized PredictRequest (UINT8) for an (N, 28, 28) uint8 array; ``fmt`` "packed" asks
    for the packed response (labels + raw_output)."""
    import numpy as np

    from protos import inference_pb2 as pb
    x = np.ascontiguousarray(images_u8, dtype=np.uint8)
    kw = {}
    if fmt == "packed":
        kw["format"] = pb.FORMAT_PACKED
    elif fmt != "predictions":
        raise ValueError(f"unknown response format {fmt!r}; expected one of {FORMATS}")
    return pb.PredictRequest(id=request_id, datatype="UINT8", shape=[len(x), H, W],
                             raw_input=x.tobytes(), **kw).SerializeToString()


def pool_requests(pool, batch: int, fmt: str = "predictions") -> list[bytes]:
    """The attack pool cut into consecutive full batches, each serialized once."""
    n = max(1, len(pool) // batch)
    return [encode_request(pool[i * batch:(i + 1) * batch], fmt) for i in range(n)]


class NoisyRequests:
    """Fresh requests made on demand: pool images plus Gaussian noise (sigma 0.05 of the range),
    rounded to uint8, so nothing is an exact repeat (the monitor's expensive case)."""

    def __init__(self, pool, batch: int, seed: int, fmt: str = "predictions",
                 sigma: float = 0.05):
        import numpy as np
        self.np = np
        self.fmt = fmt
        self.pool = pool
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        self.sigma = sigma * 255.0

    def __call__(self, i: int) -> bytes:
        np = self.np
        idx = self.rng.integers(0, len(self.pool), self.batch)
        x = self.pool[idx].astype(np.float32) + self.rng.normal(0.0, self.sigma,
                                                                 (self.batch, H, W))
        return encode_request(np.clip(np.rint(x), 0, 255).astype(np.uint8), self.fmt)


def check_response(raw: bytes, batch: int) -> dict:
    """Parse one response, in either layout: N answers, and 10 probabilities each when the
    answer kind says probabilities were sent (none otherwise)."""
    from protos import inference_pb2 as pb
    r = pb.PredictResponse.FromString(raw)
    kind = pb.AnswerKind.Name(r.kind)
    probs_sent = r.kind == pb.ANSWER_PROBABILITIES
    packed = len(r.predictions) == 0 and len(getattr(r, "labels", ())) > 0
    if packed:
        n = len(r.labels)
        per_item = len(r.raw_output) / (4 * n)
        n_probs = [int(per_item)] if per_item == int(per_item) else [per_item]
    else:
        n = len(r.predictions)
        n_probs = sorted({len(p.probabilities) for p in r.predictions})
    ok = n == batch and (n_probs == [10] if probs_sent else n_probs in ([], [0]))
    return {"ok": bool(ok), "n": n, "kind": kind, "format": "packed" if packed else "predictions",
            "n_probs": n_probs, "bytes": len(raw)}


# --- one worker process --------------------------------------------------------------------------
async def _client(spec: dict, key: str, offset: int, source, counter) -> dict:
    import asyncio

    import grpc

    batch = spec["batch"]
    m0, m1 = spec["m0"], spec["m1"]
    max_requests = spec["max_requests"]
    res = {"key": key, "requests": 0, "images": 0, "lat_ms": [], "sent": 0, "ok": 0,
           "errors": {}, "check": None, "last_kind": None, "last_format": None,
           "connect_error": None}
    errors: Counter = Counter()
    opts = [("grpc.use_local_subchannel_pool", 1),  # a connection of its own, like a real client
            ("grpc.max_receive_message_length", MAX_MSG),
            ("grpc.max_send_message_length", MAX_MSG)]
    async with grpc.aio.insecure_channel(spec["address"], options=opts) as ch:
        call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        md = (("x-api-key", key),)
        try:
            await asyncio.wait_for(ch.channel_ready(), timeout=spec.get("connect_timeout", 20.0))
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
            res["connect_error"] = repr(exc)
            return res
        delay = spec["t_start"] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        last = None
        i = offset
        while res["sent"] < max_requests and time.monotonic() < m1:
            req = source(i)
            i += 1
            res["sent"] += 1
            t0 = time.monotonic()
            try:
                resp = await call(req, metadata=md, timeout=spec["timeout"])
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                if spec.get("stop_on_error"):
                    break
                await asyncio.sleep(0.05)  # never spin on a failing server
                continue
            t1 = time.monotonic()
            res["ok"] += 1
            if counter is not None:
                with counter.get_lock():
                    counter.value += batch
            if res["check"] is None:
                res["check"] = check_response(resp, batch)
            last = resp
            if m0 <= t1 <= m1:
                res["requests"] += 1
                res["images"] += batch
                res["lat_ms"].append((t1 - t0) * 1e3)
        if last is not None:
            c = check_response(last, batch)
            res["last_kind"], res["last_format"] = c["kind"], c["format"]
    res["errors"] = dict(errors)
    return res


async def _run(spec: dict, pool, cache: dict, counter) -> dict:
    import asyncio
    import zlib

    batch, fmt = spec["batch"], spec.get("format", "predictions")
    if spec.get("source", "pool") == "pool":
        reqs = cache.get((batch, fmt))
        if reqs is None:
            reqs = cache[(batch, fmt)] = pool_requests(pool, batch, fmt)
        sources = [lambda i, r=reqs: r[i % len(r)] for _ in spec["keys"]]
        offsets = [zlib.crc32(k.encode()) % len(reqs) for k in spec["keys"]]
    else:
        sources = [NoisyRequests(pool, batch, zlib.crc32(k.encode()), fmt)
                   for k in spec["keys"]]
        offsets = [0] * len(spec["keys"])
    cpu0 = time.process_time()
    out = await asyncio.gather(*[_client(spec, k, o, s, counter)
                                 for k, o, s in zip(spec["keys"], offsets, sources)])
    return {"clients": out, "cpu_s": time.process_time() - cpu0}


def worker_main(conn, index: int, counter) -> None:
    """Serve commands from the parent until 'stop' or the pipe closes."""
    import asyncio
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    pool = None
    cache: dict[tuple[int, str], list[bytes]] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        cmd = msg.get("cmd")
        try:
            if cmd == "stop":
                conn.send({"ok": True})
                return
            if cmd == "init":
                pool = msg["pool"]
                cache.clear()
                conn.send({"ok": True, "pid": os.getpid()})
            elif cmd == "run":
                if pool is None:
                    raise RuntimeError("worker not initialised with the image pool")
                conn.send({"ok": True, "result": asyncio.run(_run(msg["spec"], pool, cache,
                                                                  counter))})
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send({"ok": False, "error": traceback.format_exc()})


# --- the parent's side ---------------------------------------------------------------------------
class ClientPool:
    """``n`` client processes. ``run(spec, keys)`` spreads ``keys`` round-robin over them, runs
    the same spec in each and returns the per-client results of all of them."""

    def __init__(self, n: int, pool):
        import multiprocessing as mp
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"  # inherited by the spawned clients
        ctx = mp.get_context("spawn")
        self.n = n
        self.counters = [ctx.Value("q", 0) for _ in range(n)]
        self.conns, self.procs = [], []
        for i in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(b, i, self.counters[i]), daemon=True,
                            name=f"bench-client-{i}")
            p.start()
            b.close()
            self.conns.append(a)
            self.procs.append(p)
        for c in self.conns:
            c.send({"cmd": "init", "pool": pool})
        for i, c in enumerate(self.conns):
            self._recv(i, 120.0)

    def _recv(self, i: int, timeout: float):
        c = self.conns[i]
        if not c.poll(timeout):
            raise TimeoutError(f"client process {i} did not answer within {timeout:.0f} s")
        msg = c.recv()
        if not msg.get("ok"):
            raise RuntimeError(f"client process {i} failed:\n{msg.get('error')}")
        return msg

    def progress(self) -> int:
        return sum(c.value for c in self.counters)

    def reset_progress(self) -> None:
        for c in self.counters:
            with c.get_lock():
                c.value = 0

    def start(self, spec: dict, keys: list[str]) -> list[int]:
        used = []
        for i in range(self.n):
            mine = keys[i::self.n]
            if mine:
                self.conns[i].send({"cmd": "run", "spec": dict(spec, keys=mine)})
                used.append(i)
        return used

    def collect(self, used: list[int], timeout: float, tick=None, poll: float = 0.5
                ) -> tuple[list[dict], float]:
        """Results of the processes started by ``start``; ``tick()`` is called about twice a
        second while waiting (progress bars, the crash test's kill)."""
        deadline = time.monotonic() + timeout
        clients, cpu = [], 0.0
        for i in used:
            while not self.conns[i].poll(poll):
                if tick is not None:
                    tick()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client process {i} did not finish within {timeout:.0f} s")
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"client process {i} died (exit code "
                                       f"{self.procs[i].exitcode})")
            r = self._recv(i, 1.0)["result"]
            clients.extend(r["clients"])
            cpu += r["cpu_s"]
        if tick is not None:
            tick()
        return clients, cpu

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send({"cmd": "stop"})
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
            if p.is_alive():
                p.kill()
        for c in self.conns:
            c.close()
