"""Defences: the answer policies behind each escalation level, model switching and watermarking.

Interface used by the service (no gRPC and no torch imported here; torch loads only when a pool
model is used):

    policy = build_policy({"policy": "gaussian", "sigma": 0.05}, artifacts=Path("artifacts"))
    ctx = PolicyContext(client_id, key, request_id=request_id)   # one per request
    answer = policy.answer(images, target_probs, ctx)
    wm = Watermark.from_spec({"enabled": True, "rate": 0.005}, key)
    if wm: answer = wm.apply(images, answer, ctx, target_probs, qn0=client_queries)

The context computes the batch's keyed per-image digests once, on first use (ctx.digests), and
noise, routing and the watermark all read their own byte ranges of them.

CLI: python -m service.defences {train-pool, verify}; the policy table and the watermark demo
are measured by the lab (python -m lab.defences). See docs/defences.md.
"""
from service.defences.base import DIGEST_SCHEME, AnswerPolicy, InputDigests, PolicyContext
from service.defences.registry import SPECS, build_policy
from service.defences.watermark import VerifyResult, Watermark, verify

POLICY_NAMES = tuple(SPECS)

__all__ = ["AnswerPolicy", "PolicyContext", "InputDigests", "DIGEST_SCHEME", "build_policy",
           "Watermark", "verify", "VerifyResult", "POLICY_NAMES"]
