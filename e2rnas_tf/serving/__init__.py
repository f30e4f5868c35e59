"""Export to TF Serving (`e2rnas export`).
"""
