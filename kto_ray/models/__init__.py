"""Loading tokenizers and causal LMs, and the summed completion log-probs every stage computes."""
