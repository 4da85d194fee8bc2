"""Shared pytest setup for almak's tests."""

import os

# Must happen before anything imports triton: triton.jit decides at decoration time whether kernels are
# interpreted. setdefault lets a GPU run opt out with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
