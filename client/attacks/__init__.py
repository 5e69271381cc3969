"""Registry of attacks: CLI name -> class. Each class may declare
``needs`` (data it is handed: "pool" = attack_pool(), "ood" = ood_pool()) and
``params`` ({name: (type, default, help)}) for its extra command-line options."""
from client.attacks.base import Attack, AttackResult
from client.attacks.copycat import Copycat, CopycatLabels

ATTACKS = {
    "copycat": Copycat,
    "copycat-labels": CopycatLabels,
}

__all__ = ["ATTACKS", "Attack", "AttackResult", "Copycat", "CopycatLabels"]
