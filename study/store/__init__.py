"""The store layer: the only code that talks to MLflow (runs, lease, bulk reads, the server).
"""
