"""Applications built on the core: verification by retraining, the fact-tracing benchmark, the demo,
reports and plots.

The core (``runlog``, ``curriculum``, ``design``, ``solvers``, ``simulators``, ``counterfactual``,
``metrics``) never imports from here; these modules read its results and train, score or draw.
"""
