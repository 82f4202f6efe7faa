"""What a model means: its heads, its metrics, its builder, the run folder and best.pt, the devices."""
