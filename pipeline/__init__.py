"""Shards: writing them (``pipeline.writing``) and reading them (``pipeline.loading``).

The two halves share only the shard format (``pipeline.shardformat``) and the manifest
(``pipeline.manifest``), plus constants, file helpers and the command-line helper.
"""
