"""The graph passes of fxprune (installed as ``fxprune.passes``), one pass per module.

In pipeline order (``fxprune.compile`` runs them through :mod:`fxprune.pipeline`):

front end   ``trace`` (+ ``twin``, ``shape_prop``)  -> GraphModule with shapes
analysis    ``groups`` (rules: ``rule_table`` and its families; ``ties``) -> Analysis;
            ``connectivity`` -> series/parallel structure
scoring     ``lower_attention`` -> ``score`` (dispatches to ``fxprune.criteria``)
selection   ``degenerate`` (score checks), ``count`` (cost model; ``latency_table`` for
            latency budgets), ``budget``, ``widths``,
            ``select`` -> kept channels per group
rewrite     ``rewrite`` -> slim GraphModule; ``verify`` (masked-equivalence oracle)
repair      ``sweep`` -> ``repair`` (``lstsq``; ``obs_solve`` for ``criterion="obs"``)

Each module's docstring states what it reads, what it writes and the invariant it
keeps; ``passes/README.md`` has the same list as a table.
"""

#: Pass modules in pipeline order (helpers of a pass are listed after it).
PIPELINE = ("trace", "twin", "shape_prop", "groups", "ties", "connectivity",
            "lower_attention", "score", "degenerate", "count", "latency_table", "budget",
            "widths", "select", "rewrite", "verify", "sweep", "repair", "lstsq", "obs_solve")
