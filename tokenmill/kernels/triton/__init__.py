"""Triton kernels for paged attention. Importing this package imports triton."""

from tokenmill.kernels.triton.attention import paged_attention
from tokenmill.kernels.triton.decode import choose_num_splits, paged_decode
from tokenmill.kernels.triton.kv_write import reshape_and_cache
from tokenmill.kernels.triton.prefill import paged_prefill

__all__ = ["choose_num_splits", "paged_attention", "paged_decode", "paged_prefill", "reshape_and_cache"]
