"""Fused kernels of the SAEs: chunked TopK and threshold (JumpReLU, ReLU) encoders whose
backward is sparse, a sparse decoder, the decoder's row constraints, and the schedule-free sign
step. Torch everywhere, Triton on CUDA where it is installed.

    encode.py          topk_encode: chunked matmul + exact top-k forward, sparse backward
    threshold.py       threshold_encode: JumpReLU / ReLU, chunked, sparse backward + theta's STE
    decode.py          sparse_decode: embedding_bag forward, sampled-dot backward;
                       decode_kept: the same on a varying number of entries per token
    sparse.py          CSR views of the (N, k) activations, per-latent weight-gradient sums
    triton_kernels.py  the optional triton import, when CUDA tensors use it, the gather kernels
    rows.py            project_out_rows_, normalize_rows_: in-place row ops on W_dec
    sign_step.py       sf_sign_step_: ScheduleFreeSign's one-pass Triton step
"""

# The underscored re-exports are internals that bench/gpu_profile.py and bench/kernels.py time
# piece by piece; users need only __all__.
from sae.kernels.decode import decode_kept, sparse_decode, triton_decode
from sae.kernels.encode import CUDA_CHUNK_ELEMENTS, DEFAULT_CHUNK_SIZE, EncodeResult, topk_encode
from sae.kernels.encode import _grouped_topk as _grouped_topk
from sae.kernels.encode import _topk as _topk
from sae.kernels.encode import _transposed as _transposed
from sae.kernels.rows import normalize_rows_, project_out_rows_
from sae.kernels.sign_step import sf_sign_step_
from sae.kernels.sparse import _by_latent as _by_latent
from sae.kernels.sparse import _latent_order as _latent_order
from sae.kernels.threshold import ThresholdResult, fixed_width, threshold_encode
from sae.kernels.triton_kernels import _block_k as _block_k
from sae.kernels.triton_kernels import _gather_sum as _gather_sum
from sae.kernels.triton_kernels import triton

if triton is not None:
    from sae.kernels.triton_kernels import _decode_dacts_kernel as _decode_dacts_kernel

__all__ = [
    "CUDA_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_SIZE",
    "EncodeResult",
    "decode_kept",
    "normalize_rows_",
    "project_out_rows_",
    "sf_sign_step_",
    "sparse_decode",
    "ThresholdResult",
    "fixed_width",
    "threshold_encode",
    "topk_encode",
    "triton",
    "triton_decode",
]
