"""Defences: the answer policies behind each escalation level, model switching and watermarking.

Interface used by the service (no gRPC and no torch imported here; torch loads only when a pool
model is used):

    policy = build_policy({"policy": "gaussian", "sigma": 0.05}, artifacts=Path("artifacts"))
    answer = policy.answer(images, target_probs, PolicyContext(client_id, key, rng))
    wm = Watermark.from_spec({"enabled": True, "rate": 0.005}, key)
    if wm: answer = wm.apply(images, answer, ctx)

CLI: python -m service.defences {train-pool, verify, bench}. See docs/defences.md.
"""
from service.defences.base import AnswerPolicy, PolicyContext
from service.defences.registry import SPECS, build_policy
from service.defences.watermark import VerifyResult, Watermark, verify

POLICY_NAMES = tuple(SPECS)

__all__ = ["AnswerPolicy", "PolicyContext", "build_policy", "Watermark", "verify",
           "VerifyResult", "POLICY_NAMES"]
