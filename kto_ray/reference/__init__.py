"""Stage 1: the reference model's log-probs, computed once by Ray Data into the Parquet reference store."""
