"""Diversity studies: a grid of runs, judged and tabled together."""
