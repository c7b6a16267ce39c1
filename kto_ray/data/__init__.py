"""Input rows: reading and validating sources, chat rendering, tokenizing with truncation, KL pairing."""
