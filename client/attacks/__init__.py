"""Registry of attacks: CLI name -> class.

Conventions (read by client/cli.py; see docs/attacks.md):

* every class subclasses :class:`client.attacks.base.Attack`:
  ``cls(oracle, budget, *, seed, surrogate, train_config, batch_size, progress, **extra)``;
* ``cls.needs``: data handed in as keyword arguments, ``"pool"`` -> ``data.attack_pool()``,
  ``"ood"`` -> ``data.ood_pool()``;
* ``cls.params``: extra keyword arguments, ``{name: (type, default, help)}`` (bool params are
  flags that default to False);
* ``cls.answers``: ``"probabilities"`` if the attack needs them, ``"labels"`` if labels suffice;
* any attack can be spread over N API keys with
  :class:`client.attacks.adaptive.SybilOracle` (``SybilOracle(oracles, budget=B)``) or
  :class:`client.attacks.adaptive.Sybil`.
"""
from client.attacks.activethief import ActiveThief
from client.attacks.adaptive import InterleavedJBDA, Sybil, SybilOracle
from client.attacks.base import Attack, AttackResult
from client.attacks.copycat import Copycat, CopycatLabels
from client.attacks.equivalent import FunctionallyEquivalent
from client.attacks.jbda import JBDA
from client.attacks.knockoff import Knockoff

ATTACKS: dict[str, type[Attack]] = {
    "copycat": Copycat,
    "copycat-labels": CopycatLabels,
    "knockoff": Knockoff,
    "jbda": JBDA,
    "activethief": ActiveThief,
    "equivalent": FunctionallyEquivalent,
    "interleaved-jbda": InterleavedJBDA,
}

__all__ = ["ATTACKS", "Attack", "AttackResult", "ActiveThief", "Copycat", "CopycatLabels",
           "FunctionallyEquivalent", "InterleavedJBDA", "JBDA", "Knockoff", "Sybil",
           "SybilOracle"]
