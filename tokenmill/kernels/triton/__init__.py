"""Triton kernels for paged attention. Importing this package imports triton."""

import os

# Every result of these kernels was measured and tested with FMA contraction in their fp32 math, Triton's default
# up to 3.9, which warns that the default turns it off in 3.10. Pinned here (an explicit environment setting wins),
# so one behaviour holds across the Triton versions we run on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from tokenmill.kernels.triton.attention import paged_attention
from tokenmill.kernels.triton.decode import choose_num_splits, paged_decode
from tokenmill.kernels.triton.kv_write import reshape_and_cache
from tokenmill.kernels.triton.prefill import paged_prefill

__all__ = ["choose_num_splits", "paged_attention", "paged_decode", "paged_prefill", "reshape_and_cache"]
