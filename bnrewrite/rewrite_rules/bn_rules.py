"""The BatchNorm rule set: where a BatchNorm goes is the first rule whose check passes, in this
order; what stays says why every rule refused (the reasons in order, the first one's code).
A rule file declares what it matches, its check, its rewrite and its local check:

- :mod:`.into_preceding` - into the layer before (FD101), or a Linear through reshapes (FD107);
- :mod:`.into_concat` - into every layer of a channel concatenation before it (FD105);
- :mod:`.into_sum` - into every term of a sum before it (FD106);
- :mod:`.into_following` - into every layer after it (FD102, FD107).

The user's policy (a target dtype that must not overflow, FD111; the speed check of a new
transposed-conv bias, FD108) is applied to the rule's decision by ``plan.fold_plan``.
"""

from __future__ import annotations

from bnrewrite.plan.decision import (
    FOLLOWING,
    NOT_FOLDABLE,
    SCALE_SHIFT,
    Decision,
    FoldPolicy,
    RankOf,
    stats_problem,
)
from bnrewrite.plan.fold_plan import apply_policy
from bnrewrite.rewrite_rules import into_concat, into_following, into_preceding, into_sum
from bnrewrite.semantics.norms import BNSite

RULES = {r.NAME: r for r in (into_preceding, into_concat, into_sum, into_following)}
CHECKS = (
    into_preceding.check,
    into_concat.check,
    into_sum.check,
    into_preceding.check_reshaped,
    into_following.check,
)


def decide(site: BNSite, rank_of: RankOf, policy: FoldPolicy | None = None) -> Decision:
    """The fold decision for one BatchNorm site under the user's ``policy``. One that no
    neighbour can absorb stays a BatchNorm (a fold must never add work) unless the policy asks
    for a scale-and-shift (``bn_to_affine``)."""
    policy = policy or FoldPolicy()
    return apply_policy(_decide(site, rank_of, policy.eval_mode, policy.bn_to_affine), rank_of, policy)


def _decide(site: BNSite, rank_of: RankOf, eval_mode: bool, bn_to_affine: bool) -> Decision:
    if not site.constant:
        return Decision(
            site, NOT_FOLDABLE, "FD204", "statistics or affine parameters are computed in the graph"
        )
    if not site.tracks_stats:
        return Decision(
            site, NOT_FOLDABLE, "BN005", "track_running_stats=False: normalizes with batch statistics"
        )
    if site.training and not eval_mode:
        return Decision(site, NOT_FOLDABLE, "BN002", "in training mode (call model.eval() or pass --eval)")
    problem = stats_problem(site)
    if problem:
        return Decision(site, NOT_FOLDABLE, "BN004", problem)
    notes: list[tuple[str, str]] = []
    for check in CHECKS:  # in order: the first rule that matches decides
        decision, note = check(site, rank_of, eval_mode)
        if decision is not None:
            decision.notes = notes + decision.notes if decision.verdict == FOLLOWING else decision.notes
            return decision
        if note:
            notes.append(note)
    if not notes:
        notes.append(("FD206", "no conv/linear directly before or after it"))
    reason = "; ".join(f"{msg} ({code})" for code, msg in notes)
    if site.is_affine_layer:  # an affine layer no neighbour absorbs: already one op, it stays
        return Decision(site, NOT_FOLDABLE, notes[0][0], f"stays as it is: {reason}", notes=notes)
    if bn_to_affine:
        return Decision(site, SCALE_SHIFT, notes[0][0], f"becomes scale-and-shift: {reason}", notes=notes)
    return Decision(
        site,
        NOT_FOLDABLE,
        notes[0][0],
        f"stays a BatchNorm (one fused op in eval mode; --bn-to-affine makes it a scale-and-shift): {reason}",
        notes=notes,
    )
