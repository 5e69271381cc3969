"""common.memory: the start-up heap out of Python's full garbage collections, and who calls it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run in a process of its own: freezing pytest's heap would keep this session's garbage
FREEZE = """
import gc, weakref
from common.memory import freeze_startup_heap
class Node: pass
a = Node(); a.me = a; dead = weakref.ref(a); del a     # start-up garbage, in a cycle
kept = [Node() for _ in range(1000)]
n = freeze_startup_heap()
walked = {id(o) for o in gc.get_objects()}
later = [Node() for _ in range(3)]
walked_later = {id(o) for o in gc.get_objects()}
print(dead() is None, n >= 1000, sum(id(k) in walked for k in kept),
      all(id(o) in walked_later for o in later))
"""


def test_freezing_keeps_the_startup_objects_out_of_full_collections():
    """Start-up garbage is collected first; what survives is no longer walked by the collector
    (gc.get_objects lists what collections walk); objects made afterwards are walked as
    before."""
    out = subprocess.run([sys.executable, "-c", FREEZE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "0", "True"]


def test_serve_freezes_the_startup_heap_after_building_and_before_taking_calls(
        small_target, monkeypatch):
    """`python -m service serve`: the data plane (model, monitor) is built, then the heap is
    frozen, then the server starts taking calls."""
    import common.memory as memory
    import service.__main__ as cli

    order = []

    class FakeServer:
        address, tls = "127.0.0.1:0", False

        def __init__(self, cfg, plane):
            order.append("built")

        def start(self):
            order.append("start")
            return self

        def wait(self):
            raise SystemExit(0)

    monkeypatch.setattr("service.dataplane.build_dataplane", lambda cfg: object())
    monkeypatch.setattr("service.server.Server", FakeServer)
    monkeypatch.setattr(memory, "freeze_startup_heap", lambda: order.append("freeze") or 1)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--target", str(small_target[0]), "--open-keys", "--dev-secret",
                  "--port", "0"])
    assert order == ["built", "freeze", "start"]
