"""The search space and the derived network: candidate ops, the
supernet and its cells, genotypes, the retrained network, and
counting parameters and multiply-adds.
"""
