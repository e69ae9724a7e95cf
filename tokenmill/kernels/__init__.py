"""Backends for the hot ops. Triton code is imported only when a Triton backend is requested."""

from tokenmill.kernels.backends import AttentionBackend, get_attention_backend

__all__ = ["AttentionBackend", "get_attention_backend"]
