"""Streaming, mergeable statistics of per-token values: sketch -> summary -> concordance."""

from tailjax.stats.concordance import (UNIFORM_CONCORDANCE, Selection, concordance, correlations, discordant_pairs,
                                       pairwise_concordance, select)
from tailjax.stats.sketch import BucketSpec, HostHistogram, LogHistogram
from tailjax.stats.summary import (SequenceSummary, Summary, Verdict, compare, profile_distance, spec_for,
                                   summarize)

__all__ = [
    "UNIFORM_CONCORDANCE", "BucketSpec", "HostHistogram", "LogHistogram", "Selection", "SequenceSummary", "Summary", "Verdict", "compare",
    "concordance", "correlations", "discordant_pairs", "pairwise_concordance", "profile_distance", "select",
    "spec_for", "summarize"
]
