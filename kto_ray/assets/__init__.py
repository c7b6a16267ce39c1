"""Embedded defaults built offline: the arithmetic feedback data and the tiny Llama with its tokenizer."""
