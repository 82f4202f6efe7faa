"""Reading shards: the loader contract, its DALI and torch backends, and augmentation."""
