"""Data side of the DR grader: shard writing and reading, and the batch loaders."""
