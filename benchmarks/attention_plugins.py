"""Attention plugins for flopdiff (`--attn-plugin [NAME=]module:function`, README "Counting FlashAttention and custom
kernels"): transformers attention functions whose work never reaches the aten dispatcher, so that FlopCounterMode
counts nothing for them and only flopdiff's attention boundary node does.

  * `triton_fa2`: flash-attention-triton's FlashAttention-2 (PyPI `flash-attention-triton`, a Triton kernel launched
    from Python), the H200 proof of issue 13. Its API: (batch, heads, seq, dim) q/k/v with as many k/v heads as q
    heads, always causal with the mask aligned top-left, fp16 inside (it converts and converts back). On a decode
    step (one query, many keys) a top-left mask lets the query see the first key block only: the numbers are not a
    real decode's (the weights are random anyway), the kernel launched and its timing are what is measured.
  * `numpy_attention`: dense attention computed in NumPy on the CPU (`--mode real`): no aten op for its matmuls,
    the CPU stand-in of a Python-launched kernel (the tests use it).

    PYTHONPATH=benchmarks flopdiff --mode real --attn-plugin attention_plugins:numpy_attention \\
        --attn text_config=numpy_attention,vision_config=sdpa ...
"""

from __future__ import annotations

import numpy as np
import torch


def _kv_heads_as_q(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def triton_fa2(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface over flash_attention_v2: (b, h, s, d) in, (b, s, h, d) out."""
    from flash_attention_triton import flash_attention_v2

    key, value = _kv_heads_as_q(query, key, value)
    out = flash_attention_v2(query, key, value, softmax_scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def numpy_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Dense softmax(q k^T * scale) v in NumPy (float32), causal when the module is and there is more than one query
    (top-left, as SDPA's is_causal)."""
    key, value = _kv_heads_as_q(query, key, value)
    q, k, v = (t.detach().float().cpu().numpy() for t in (query, key, value))
    scores = (q @ k.swapaxes(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    s_q, s_k = scores.shape[-2:]
    if getattr(module, "is_causal", False) and s_q > 1:
        scores = np.where(np.tril(np.ones((s_q, s_k), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    weights = e / e.sum(axis=-1, keepdims=True)
    out = torch.from_numpy(weights @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None
