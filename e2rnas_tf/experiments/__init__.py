"""Search, retrain and evaluate as resumable stages
(`pipeline`), and the experiments built on them:
`e2rnas reproduce` and `e2rnas sweep`.
"""
