"""modelguard lab: measurement harnesses that drive the product from outside.

Nothing in the product packages (service/, monitor/, client/, common/) imports ``lab``.
``python -m lab.serving``: the wire-speed benchmark (server vs a bare echo server of the same
contract, monitor cost at long client histories, crash recovery, unary latency at long history).
``python -m lab.sybil``: adaptive evasion of cross-client linking: JBDA's step lambda against
detection and stolen accuracy, for one key and for many.
``python -m lab.dp``: DP-SGD targets (epsilon 8 / 3 / 1) against the attacks and the watermark
(docs/dp.md).
"""
