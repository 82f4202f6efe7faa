"""Developer benchmarks: the loaders, the shard writer, the trainer's step on a GPU."""
