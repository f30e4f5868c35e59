"""The E2RNAS search: objectives (network and resource), MGDA,
the bi-level step, out-of-distribution data, the search run
and `e2rnas info`.
"""
