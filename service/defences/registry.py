"""build_policy: a validated spec dict (from the monitor's TOML config) -> an AnswerPolicy."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.defences.base import AnswerPolicy
from service.defences import policies
from service.defences.pool import (MisinformationPolicy, SwitchPolicy, dp_epsilon_of, load_model,
                                   POOL_FILES)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentitySpec(_Spec):
    pass


class LabelOnlySpec(_Spec):
    pass


class GaussianSpec(_Spec):
    sigma: float = Field(0.05, gt=0, le=10)
    preserve_argmax: bool = True
    keyed: bool = True


class LaplaceSpec(_Spec):
    scale: float = Field(0.05, gt=0, le=10)
    preserve_argmax: bool = True
    keyed: bool = True


class RoundSpec(_Spec):
    decimals: int = Field(2, ge=0, le=6)


class TopKSpec(_Spec):
    k: int = Field(3, ge=1, le=10)


class ReverseSigmoidSpec(_Spec):
    beta: float = Field(1.0, gt=0, le=10)
    gamma: float = Field(0.2, gt=0, le=10)
    preserve_argmax: bool = True


class SwitchSpec(_Spec):
    models: list[str] = Field(default_factory=lambda: ["target", "cnn", "trees"], min_length=1)

    @field_validator("models")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        allowed = {"target"} | set(POOL_FILES)
        bad = [m for m in v if m not in allowed and dp_epsilon_of(m) is None]
        if bad:
            raise ValueError(f"unknown pool model(s) {bad}; expected some of {sorted(allowed)} "
                             "or DP targets 'dp_epsE' (e.g. 'dp_eps3')")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate pool models in {v}")
        return v


class MisinformationSpec(_Spec):
    mode: Literal["blend", "replace"] = "blend"
    tau: float = Field(0.99, gt=0, le=1)
    nu: float = Field(10000.0, gt=0)


SPECS: dict[str, type[_Spec]] = {
    "identity": IdentitySpec, "gaussian": GaussianSpec, "laplace": LaplaceSpec,
    "round": RoundSpec, "top_k": TopKSpec, "reverse_sigmoid": ReverseSigmoidSpec,
    "label_only": LabelOnlySpec, "switch": SwitchSpec, "misinformation": MisinformationSpec,
}


def build_policy(spec: dict, *, artifacts: Path | str = Path("artifacts")) -> AnswerPolicy:
    """Build the policy a spec names, e.g. {"policy": "gaussian", "sigma": 0.05}.

    Raises ValueError for an unknown policy or bad parameters, FileNotFoundError when a pool
    model ("switch", "misinformation") has not been trained (run `make models`)."""
    if not isinstance(spec, dict):
        raise ValueError(f"a policy spec must be a table/dict, got {type(spec).__name__}")
    params = dict(spec)
    name = params.pop("policy", None)
    if name not in SPECS:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(SPECS)}")
    try:
        s = SPECS[name].model_validate(params)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}"
                         for e in exc.errors())
        raise ValueError(f"bad parameters for policy {name!r} ({params}): {errs}") from None
    artifacts = Path(artifacts)
    if name == "identity":
        return policies.IdentityPolicy()
    if name == "label_only":
        return policies.LabelOnlyPolicy()
    if name == "gaussian":
        return policies.NoisePolicy("gaussian", s.sigma, s.preserve_argmax, s.keyed)
    if name == "laplace":
        return policies.NoisePolicy("laplace", s.scale, s.preserve_argmax, s.keyed)
    if name == "round":
        return policies.RoundPolicy(s.decimals)
    if name == "top_k":
        return policies.TopKPolicy(s.k)
    if name == "reverse_sigmoid":
        return policies.ReverseSigmoidPolicy(s.beta, s.gamma, s.preserve_argmax)
    if name == "switch":
        return SwitchPolicy({m: None if m == "target" else load_model(artifacts, m)
                             for m in s.models})
    return MisinformationPolicy(load_model(artifacts, "misinformation"), s.mode, s.tau, s.nu)
