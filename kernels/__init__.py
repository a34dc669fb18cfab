"""Attention and cache kernels: each Triton kernel sits beside its `*_ref` PyTorch reference.

The runtime calls the references on the CPU; the Triton kernels (GPU) are added beside them.
"""
