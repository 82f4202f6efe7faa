"""Writing shards: the input layouts, preprocessing, and packing into tars with a manifest."""
