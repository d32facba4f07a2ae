"""Speculative decoding: draft tokens from a proposer, verified by the target in one forward.

One file per concept: ``proposal`` (what a proposer returns), ``draft_model`` (a small model on
its own paged cache), ``ngram`` (prompt lookup), ``adaptive`` (how many drafts to ask for),
``verifier`` (rejection sampling of a step's drafts), ``metrics`` and ``speculator`` (the
piece the engine drives: plan, propose, verify, release).
"""

from quantkit.runtime.spec.adaptive import AdaptiveK
from quantkit.runtime.spec.draft_model import DraftModelProposer
from quantkit.runtime.spec.metrics import SpecMetrics
from quantkit.runtime.spec.ngram import NgramProposer, find_continuation
from quantkit.runtime.spec.proposal import Proposal
from quantkit.runtime.spec.speculator import Speculator
from quantkit.runtime.spec.verifier import Verified, verify

__all__ = [
    "AdaptiveK",
    "DraftModelProposer",
    "NgramProposer",
    "Proposal",
    "SpecMetrics",
    "Speculator",
    "Verified",
    "find_continuation",
    "verify",
]
