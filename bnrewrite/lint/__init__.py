"""Read-only analysis rules, one per file, gathered here explicitly (no import side effects)."""

from bnrewrite.lint import (
    bad_statistics,
    bias_before_bn,
    dropout_before_bn,
    no_running_stats,
    norm_after_norm,
    producer_shared,
    shared_conv,
    stats_never_updated,
    tiny_batch,
    training_mode,
)
from bnrewrite.lint.context import Rule, RuleContext

RULES: dict[str, Rule] = {
    m.CODE: m.check
    for m in (
        bias_before_bn,
        training_mode,
        stats_never_updated,
        bad_statistics,
        no_running_stats,
        dropout_before_bn,
        norm_after_norm,
        tiny_batch,
        producer_shared,
        shared_conv,
    )
}

__all__ = ["RULES", "Rule", "RuleContext"]
