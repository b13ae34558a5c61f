"""The Ray layer: actors and tasks that only move work and state between particles and the score estimator.

Only this package imports ray.
"""
