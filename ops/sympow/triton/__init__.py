"""Triton kernels for symmetric power attention, launched through ops.sympow.triton.launch."""
