"""Counterfactual curricula: what would the model have done with a different curriculum?

Three modules, one per concept, all answered by a fitted simulator, batched over curricula and test examples:

- :mod:`~simfluence.counterfactual.edits`: the edit language (remove, duplicate, move, swap, reverse, keep a
  subset, replace, truncate; :func:`parse_edit`, :func:`apply_edits`, :func:`move_all`);
- :mod:`~simfluence.counterfactual.queries`: ``whatif`` (named edited scenarios, predicted trajectories and
  their change against the base), ``loo_effects`` (the effect of removing each pool example, for all at once)
  and ``influence_table`` (the same as a proponents / opponents table, for any simulator);
- :mod:`~simfluence.counterfactual.search`: ``search_curriculum`` (greedily drop examples, or shrink to a
  subset) and ``search_order`` (greedily move examples to the start or the end) to lower or raise the mean
  final loss of chosen test examples.

Pool and test examples are named by their **external ids** everywhere here (the ids of the run set the
simulator was fitted on, ``simulator.pool_ids_`` / ``simulator.test_ids_``), as on the command line; results
carry external ids too. ``intervals=`` (a :class:`~simfluence.uncertainty.Bootstrap`) gives every answer an
interval and says where its sign is not sure (``straddles_zero``).
"""
from __future__ import annotations

from simfluence.counterfactual.edits import Edit, apply_edits, move_all, parse_edit, parse_scenario
from simfluence.counterfactual.queries import (
    BATCH_SIZE_FACTOR,
    Base,
    LooEffects,
    WhatIf,
    influence_table,
    loo_effects,
    resolve_base,
    warn_unseen_batch_sizes,
    whatif,
)
from simfluence.counterfactual.search import ReorderResult, SearchResult, search_curriculum, search_order

__all__ = ["BATCH_SIZE_FACTOR", "Base", "Edit", "LooEffects", "ReorderResult", "SearchResult", "WhatIf",
           "apply_edits", "influence_table", "loo_effects", "move_all", "parse_edit", "parse_scenario",
           "resolve_base", "search_curriculum", "search_order", "warn_unseen_batch_sizes", "whatif"]
