"""Retraining a genotype (`e2rnas train`) and evaluating it
under attacks (`e2rnas evaluate`).
"""
