"""Counting what a run allocates and computes, op by op, on any device (meta included).

:class:`Trace` is a TorchDispatchMode that keeps the set of live tensor storages:
every storage an op returns is counted once when it appears and uncounted when it
is freed (a finaliser on the storage). An output that shares the storage of one of
the op's inputs is a view or an in-place result and allocates nothing, which also
keeps views of weights (``aten.t`` in a Linear) from being counted as activations.
Storages that exist before the trace (weights) are counted only if registered with
:meth:`Trace.register`. In the same pass, matmul / convolution / attention FLOPs
are summed with torch's own formulas (``torch.utils.flop_counter``).

:func:`fused_attention` (a TorchFunctionMode) makes ``F.scaled_dot_product_attention``
allocate what a GPU's fused kernel does: on meta it would otherwise decompose into
the math path that materialises the N x N scores. It calls the aten flash kernel
(fp16/bf16, head dim <= 256, no mask) or the memory-efficient one (otherwise), whose
meta implementations return the output plus the fp32 logsumexp, as on CUDA.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_aten = torch.ops.aten


def _am_attention_flops(q, k, v, q_lr, k_lr, *args, **kwargs) -> int:
    """AM in O(N) form: the high-res attention over N tokens plus the native one over n."""
    B, heads, N, d = q.shape
    n = q_lr.shape[2]
    return 4 * B * heads * N * N * d + 4 * B * heads * n * n * d


def _cpu_flash_flops(q, k, v, *args, **kwargs) -> int:
    B, heads, N, d = q.shape
    return 4 * B * heads * N * k.shape[-2] * d


def _extra_flops() -> Dict[object, object]:
    extra = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}
    am_op = getattr(getattr(torch.ops, "fam_kernels", None), "am_attention", None)
    if am_op is not None:
        extra[am_op] = _am_attention_flops
    return extra


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class Trace(TorchDispatchMode):
    """Live bytes, peak bytes and FLOPs of everything run inside ``with Trace() as tr``.

    ``segment(name)`` records the peak reached inside a block in ``segments[name]``
    (the highest, if entered several times).
    """

    def __init__(self, count_cpu: bool = False):
        super().__init__()
        # CPU tensors count only when the model itself runs on the CPU (the measured
        # check); in a meta trace they are tokenizer ids and scheduler tables
        self.count_cpu = count_cpu
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.flops = 0
        self.flops_by_op: Dict[str, int] = {}
        self.segments: Dict[str, int] = {}
        self.segment_flops: Dict[str, int] = {}
        self._open_segments: Dict[str, int] = {}
        self._segment_start_flops: Dict[str, int] = {}
        self._extra = _extra_flops()

    # ------------------------------------------------------------------ storages
    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        for name in self._open_segments:
            self._open_segments[name] = max(self._open_segments[name], self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def register(self, *tensors_or_modules) -> int:
        """Count storages that already exist (e.g. a module's weights); returns the bytes added."""
        before = self.current
        for item in tensors_or_modules:
            tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, torch.nn.Module) \
                else [x for x in tree_flatten(item)[0] if isinstance(x, torch.Tensor)]
            for t in tensors:
                self._add(t.untyped_storage())
        return self.current - before

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextmanager
    def segment(self, name: str) -> Iterator[None]:
        self._open_segments[name] = self.current
        flops = self.flops
        try:
            yield
        finally:
            peak = self._open_segments.pop(name)
            self.segments[name] = max(self.segments.get(name, 0), peak)
            self.segment_flops[name] = self.segment_flops.get(name, 0) + self.flops - flops

    def begin(self, name: str) -> None:
        """Open segment ``name`` (closed by :meth:`end`), for phases that no ``with`` block spans."""
        if name not in self._open_segments:
            self._open_segments[name] = self.current
            self._segment_start_flops[name] = self.flops

    def end(self, name: str) -> None:
        if name in self._open_segments:
            peak = self._open_segments.pop(name)
            self.segments[name] = max(self.segments.get(name, 0), peak)
            flops = self.flops - self._segment_start_flops.pop(name)
            self.segment_flops[name] = self.segment_flops.get(name, 0) + flops

    def segments_flops(self) -> Dict[str, tuple]:
        """name -> (peak bytes, FLOPs summed over its entries)."""
        return {name: (peak, self.segment_flops[name]) for name, peak in self.segments.items()}

    def _bump(self, level: int) -> None:
        self.peak = max(self.peak, level)
        for name in self._open_segments:
            self._open_segments[name] = max(self._open_segments[name], level)

    def replayed(self, fn, key, returns_arg: int | None = None) -> object:
        """``fn`` wrapped so that repeated calls with the same ``key(*args)`` (e.g. the VAE
        decoder on tiles of one shape) are traced once: later calls replay the first
        one's peak above the live bytes and its FLOPs, and allocate an output of the
        same shape, dtype and strides (or return positional argument ``returns_arg``, for
        functions that update an argument in place and return it). Valid for calls whose
        allocations depend only on the key (module forwards on inputs of one shape)."""
        memo: Dict[object, tuple] = {}

        def wrapper(*args, **kwargs):
            k = key(*args, **kwargs)
            if k in memo:
                peak_above, flops, (shape, stride, dtype, device) = memo[k]
                self._bump(self.current + peak_above)
                self.flops += flops
                self.flops_by_op["replayed"] = self.flops_by_op.get("replayed", 0) + flops
                if returns_arg is not None:
                    return args[returns_arg]
                return torch.empty_strided(shape, stride, dtype=dtype, device=device)
            outer_peak, start, flops = self.peak, self.current, self.flops
            self.peak = self.current
            out = fn(*args, **kwargs)
            memo[k] = (self.peak - start, self.flops - flops, (out.shape, out.stride(), out.dtype, out.device))
            self.peak = max(self.peak, outer_peak)
            return out
        return wrapper

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(x) for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (self.count_cpu or t.device.type != "cpu"):
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._add(storage)
        packet = func.overloadpacket
        formula = flop_registry.get(packet) or self._extra.get(packet)
        if formula is not None:
            if packet in flop_registry:
                flops = formula(*args, **kwargs, out_val=out)
            else:
                flops = formula(*args, **kwargs)
            self.flops += int(flops)
            self.flops_by_op[str(packet)] = self.flops_by_op.get(str(packet), 0) + int(flops)
        return out


# --------------------------------------------------------------------------- attention

def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    head_dim = query.shape[-1]
    flash = (query.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and head_dim % 8 == 0
             and attn_mask is None)
    if flash:
        return _aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                         scale=scale)[0]
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype) if attn_mask.dtype != torch.bool else \
            torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return _aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal,
                                                         scale=scale)[0]


class _FusedAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def attention_kernels(attention: str) -> Iterator[None]:
    """``"fused"``: SDPA on meta allocates like the GPU's flash / memory-efficient kernels;
    ``"math"``: SDPA decomposes into the math path (N x N scores), as on old GPUs."""
    if attention == "math":
        yield
        return
    if attention != "fused":
        raise ValueError(f"attention={attention!r} is not 'fused' or 'math'")
    with _FusedAttention():
        yield
