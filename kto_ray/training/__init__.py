"""Stage 2: the Ray Train driver, the DeepSpeed worker loop, the batch schedule and the KTO step."""
