"""Judging a model: one evaluation result per split, what val decides, both eyes, maps, the run page."""
