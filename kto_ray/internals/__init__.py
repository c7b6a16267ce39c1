"""Every use of a private name or private file of a library, one module per library.

Each module says the version it was written against; tests/internals/ has one test module per library
that fails when an upgrade moves or changes what it relies on, and tests/internals/test_nowhere_else.py
refuses such names anywhere else in kto_ray. After an upgrade of Ray, DeepSpeed, torch or
transformers, these four files are the ones to read.
"""
