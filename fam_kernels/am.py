"""Temporary: the AM helper replaces this module with the real op (validation,
dispatcher, torch/cpu/triton/cuda backends, torch.library registration)."""
import torch.nn.functional as F

from .reference import nearest_token_index


def am_attention(q, k, v, q_lr, k_lr, *, lam, hr_size, lr_size, scale=None, backend=None):
    (H, W), (h, w) = hr_size, lr_size
    B, heads, N, d = v.shape
    v_pool = F.avg_pool2d(v.transpose(-1, -2).reshape(B * heads, d, H, W).float(), (H // h, W // w))
    v_pool = v_pool.reshape(B, heads, d, h * w).transpose(-1, -2).to(v.dtype)
    hr = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lr = F.scaled_dot_product_attention(q_lr, k_lr, v_pool, scale=scale)
    return (1 - lam) * hr + lam * lr[:, :, nearest_token_index(hr_size, lr_size, v.device)]
