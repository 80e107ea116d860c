"""am_attention: the torch and C++ CPU backends against the float64 materialised
eq. 7 oracle, special values of lam, layouts, fuzz, validation, dispatch, the
torch.library registration. Triton: tests/kernels/test_am_triton.py; memory:
tests/kernels/test_am_memory.py."""

import importlib
import os

import pytest
import torch
from devices import backends_on, device_backends
from hypothesis import given
from hypothesis import strategies as st
from tolerance import assert_matches_oracle

import fam_kernels
from fam_kernels.am_attention import DISPATCHER, ENV_VAR
from fam_kernels.dispatch import BackendNotSupportedError
from fam_kernels.reference import am_attention_materialized, nearest_token_index

am = importlib.import_module("fam_kernels.am_attention")  # the module (fam_kernels.am_attention is the op)

EXTENSION_EXPECTED = not os.environ.get("FAM_KERNELS_SKIP_BUILD")
DEVICE_BACKENDS = device_backends(DISPATCHER)
BACKENDS = backends_on(DISPATCHER, "cpu")  # CPU-only checks

# (lr_size, hr_size): square 2x, square 3x, anisotropic 2x4, odd sizes
GRIDS = [((4, 4), (8, 8)), ((6, 6), (18, 18)), ((4, 8), (8, 32)), ((5, 7), (10, 14))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, heads, lr_size, hr_size, d, dtype=torch.float32, device="cpu"):
    N, n = hr_size[0] * hr_size[1], lr_size[0] * lr_size[1]
    hr = [torch.randn(B, heads, N, d).to(device, dtype) for _ in range(3)]
    lr = [torch.randn(B, heads, n, d).to(device, dtype) for _ in range(2)]
    return (*hr, *lr)


def check_against_oracle(backend, inputs, lr_size, hr_size, lam=0.7, scale=None):
    kw = dict(lam=lam, hr_size=hr_size, lr_size=lr_size, scale=scale)
    out = fam_kernels.am_attention(*inputs, backend=backend, **kw)
    dtype = inputs[0].dtype
    assert out.dtype == dtype and out.shape == inputs[0].shape
    oracle = am_attention_materialized(*inputs, precision=torch.float64, **kw)
    torch_same_dtype = am_attention_materialized(*inputs, precision=dtype, **kw)
    assert_matches_oracle(out, oracle, torch_same_dtype)


def test_extension_loaded_when_expected():
    if EXTENSION_EXPECTED:
        assert fam_kernels.extension_unavailable_reason() is None
        assert hasattr(torch.ops.fam_C, "am_attention")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 64])
@pytest.mark.parametrize("lr_size,hr_size", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_matches_oracle(device, backend, dtype, d, lr_size, hr_size):
    B, heads = (2, 3) if d == 40 else (1, 4)
    check_against_oracle(backend, make_inputs(B, heads, lr_size, hr_size, d, dtype, device), lr_size, hr_size)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("d,dtype", [(59, torch.float32), (80, torch.float16), (128, torch.bfloat16),
                                     (128, torch.float32), (8, torch.float32)], ids=str)
def test_other_head_dims(device, backend, d, dtype):
    lr, hr = (4, 6), (8, 12)
    check_against_oracle(backend, make_inputs(1, 2, lr, hr, d, dtype, device), lr, hr, lam=0.3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_custom_scale_and_one_to_one_grid(device, backend):
    lr = hr = (5, 3)  # s = 1: U is the identity, the op is plain attention on both terms
    check_against_oracle(backend, make_inputs(2, 1, lr, hr, 16, device=device), lr, hr, lam=0.5, scale=0.37)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lam_zero_is_plain_attention(device, backend):
    lr, hr = (4, 8), (8, 32)
    q, k, v, q_lr, k_lr = make_inputs(2, 2, lr, hr, 40, device=device)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=0.0, hr_size=hr, lr_size=lr, backend=backend)
    plain = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 40 ** -0.5, -1) @ v.double()
    assert_matches_oracle(out, plain, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lam_one_is_upsampled_native_path(device, backend):
    lr, hr = (5, 7), (10, 14)
    q, k, v, q_lr, k_lr = make_inputs(1, 3, lr, hr, 64, device=device)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=1.0, hr_size=hr, lr_size=lr, backend=backend)
    pooled = torch.nn.functional.avg_pool2d(v.double().transpose(-1, -2).reshape(3, 64, *hr), 2)
    pooled = pooled.reshape(1, 3, 64, -1).transpose(-1, -2)
    native = torch.softmax(q_lr.double() @ k_lr.double().transpose(-1, -2) / 8, -1) @ pooled
    expected = native[:, :, nearest_token_index(hr, lr)]
    assert_matches_oracle(out, expected, floor=1e-5)
    # every high-res child of one native token carries the same row
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 0], out[:, :, hr[1]])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    """q/k/v as diffusers produces them: (B, N, heads, d) transposed; plus a
    non-unit feature stride (every other channel of a wider tensor)."""
    lr, hr = (4, 4), (8, 12)
    B, heads, d = 2, 3, 40
    q, k, v = (torch.randn(B, 96, heads, d, device=device).transpose(1, 2) for _ in range(3))
    q_lr = torch.randn(B, 16, heads, 2 * d, device=device).transpose(1, 2)[..., ::2]
    k_lr = torch.randn(B, heads, 16, d, device=device)
    assert not q.is_contiguous() and q_lr.stride(-1) == 2
    check_against_oracle(backend, (q, k, v, q_lr, k_lr), lr, (8, 12))
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=0.7, hr_size=hr, lr_size=lr, backend=backend)
    assert out.stride() == torch.empty_like(q).stride()  # the layout register_fake promises


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_agree(dtype):
    if not EXTENSION_EXPECTED:
        pytest.skip("C++ extension deliberately not built (FAM_KERNELS_SKIP_BUILD)")
    lr, hr = (6, 6), (18, 18)
    inputs = make_inputs(2, 2, lr, hr, 64, dtype)
    a = fam_kernels.am_attention(*inputs, lam=0.7, hr_size=hr, lr_size=lr, backend="torch")
    b = fam_kernels.am_attention(*inputs, lam=0.7, hr_size=hr, lr_size=lr, backend="cpu")
    torch.testing.assert_close(a, b, atol=4 * torch.finfo(dtype).eps, rtol=4 * torch.finfo(dtype).eps)


@given(
    lr_h=st.integers(1, 5), lr_w=st.integers(1, 5), s_h=st.integers(1, 3), s_w=st.integers(1, 4),
    d=st.integers(1, 72), heads=st.integers(1, 3), B=st.integers(1, 2), lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2 ** 16),
)
def test_fuzz_against_oracle(lr_h, lr_w, s_h, s_w, d, heads, B, lam, seed):
    torch.manual_seed(seed)
    lr, hr = (lr_h, lr_w), (lr_h * s_h, lr_w * s_w)
    inputs = make_inputs(B, heads, lr, hr, d)
    for param in DEVICE_BACKENDS:
        device, backend = param.values
        check_against_oracle(backend, [x.to(device) for x in inputs], lr, hr, lam=lam)


# --------------------------------------------------------------------------- layouts, special values, meta

LAYOUTS = ["contiguous", "transposed", "feature_major", "channels_last_like", "sliced"]


def make_layout(shape, layout, device="cpu"):
    """A random (B, heads, N, d) tensor in one of the layouts users hand the op:
    diffusers' (B, N, heads, d) transposed; token stride 1 (``randn(B, heads, d,
    N).transpose(-1, -2)``); heads innermost (channels-last-like); every other
    feature of a wider tensor (not dense)."""
    B, heads, N, d = shape
    if layout == "contiguous":
        return torch.randn(B, heads, N, d, device=device)
    if layout == "transposed":
        return torch.randn(B, N, heads, d, device=device).transpose(1, 2)
    if layout == "feature_major":
        return torch.randn(B, heads, d, N, device=device).transpose(-1, -2)
    if layout == "channels_last_like":
        return torch.randn(B, N, d, heads, device=device).permute(0, 3, 1, 2)
    if layout == "sliced":
        return torch.randn(B, heads, N, 2 * d, device=device)[..., ::2]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_output_layout_is_the_promised_one(device, backend, layout):
    lr, hr = (2, 4), (4, 8)
    hr_t = [make_layout((1, 2, 32, 16), layout, device) for _ in range(3)]
    lr_t = [make_layout((1, 2, 8, 16), layout, device) for _ in range(2)]
    out = fam_kernels.am_attention(*hr_t, *lr_t, lam=0.7, hr_size=hr, lr_size=lr, backend=backend)
    assert out.stride() == torch.empty_like(hr_t[0]).stride()  # what register_fake returns
    check_against_oracle(backend, (*hr_t, *lr_t), lr, hr)


def test_issue_example_token_stride_one():
    q = torch.randn(1, 1, 8, 16).transpose(-1, -2)  # (1, 1, 16, 8), strides (128, 128, 1, 16)
    inputs = (q, q.clone(), q.clone(), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))
    for backend in BACKENDS:
        out = fam_kernels.am_attention(*inputs, lam=0.5, hr_size=(4, 4), lr_size=(2, 2), backend=backend)
        assert out.stride() == (128, 128, 1, 16)


SPECIAL = [  # (tensor index in (q, k, v, q_lr, k_lr), value, lams)
    (3, float("nan"), (0.0, 0.5, 1.0)), (4, float("nan"), (0.0, 0.5)), (0, float("nan"), (0.0, 0.5, 1.0)),
    (0, float("inf"), (0.5,)), (1, float("inf"), (0.5,)), (2, float("inf"), (0.0, 0.5, 1.0)),
    (2, -float("inf"), (0.0, 0.7, 1.0)), (2, float("nan"), (0.0, 1.0)),
]


def check_special_values(backend, device="cpu"):
    """NaN / inf at one element of each input: the output's NaN and inf positions are the oracle's."""
    lr, hr = (2, 2), (4, 4)
    for index, value, lams in SPECIAL:
        for lam in lams:
            inputs = list(make_inputs(1, 2, lr, hr, 16, device=device))
            inputs[index][0, 1, 1, 3] = value
            kw = dict(lam=lam, hr_size=hr, lr_size=lr)
            out = fam_kernels.am_attention(*inputs, backend=backend, **kw)
            want = am_attention_materialized(*inputs, precision=torch.float64, **kw)
            case = f"{('q', 'k', 'v', 'q_lr', 'k_lr')[index]} = {value}, lam = {lam}"
            assert torch.equal(out.isnan(), want.isnan()), case
            assert torch.equal(out.isposinf(), want.isposinf()) and torch.equal(out.isneginf(), want.isneginf()), case


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_and_inf_propagate_as_in_the_oracle(device, backend):
    check_special_values(backend, device)


def _traced_allocations(fn):
    """Bytes of every tensor allocated by an aten op under fn (views excluded), in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable or func in (torch.ops.aten.detach.default,):
                return out
            inputs = {a.untyped_storage()._cdata for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                    sizes.append(t.untyped_storage().nbytes())
            return out

    with Count():
        result = fn()
    return result, sizes


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "feature_major", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_meta_models_the_cuda_default(layout, dtype):
    """On meta tensors: the promised shape, dtype and strides, and exactly the CUDA
    default's (the fused kernels') allocations, visible to a dispatch-mode tracer."""
    B, heads, d, lr, hr = 2, 3, 16, (3, 4), (6, 12)
    N, n = hr[0] * hr[1], lr[0] * lr[1]
    hr_t = [make_layout((B, heads, N, d), layout).to("meta", dtype) for _ in range(3)]
    lr_t = [make_layout((B, heads, n, d), layout).to("meta", dtype) for _ in range(2)]
    out, sizes = _traced_allocations(
        lambda: fam_kernels.am_attention(*hr_t, *lr_t, lam=0.7, hr_size=hr, lr_size=lr))
    assert out.device.type == "meta" and out.dtype == dtype and out.shape == (B, heads, N, d)
    assert out.stride() == torch.empty_like(hr_t[0]).stride()
    e = torch.empty((), dtype=dtype).element_size()
    copies = [B * heads * m * d * e for m in (N, N, N, n, n)] if hr_t[0].stride(-1) != 1 else []
    native, pooled = B * heads * n * d * 4, [B * heads * n * d * 4] + ([B * heads * n * d * e] if e != 4 else [])
    output = B * heads * N * d * e
    final_copy = [output] if torch.empty_like(hr_t[0]).stride(-1) != 1 else []
    assert sizes == copies + [native] + pooled + [output] + final_copy


# --------------------------------------------------------------------------- validation

def _good():
    return dict(zip(("q", "k", "v", "q_lr", "k_lr"), make_inputs(1, 2, (2, 3), (4, 6), 8))), \
        dict(lam=0.7, hr_size=(4, 6), lr_size=(2, 3))


def _with(**changes):
    tensors, kw = _good()
    for name, value in changes.items():
        (tensors if name in tensors else kw)[name] = value(tensors) if callable(value) else value
    return tensors, kw


BAD = [
    ("rank", _with(q=lambda t: t["q"][0]), ValueError, "q must be 4-D"),
    ("k shape", _with(k=lambda t: t["k"][:, :1]), ValueError, "k must have q's shape"),
    ("k_lr shape", _with(k_lr=lambda t: t["k_lr"][..., :4]), ValueError, "k_lr must have q_lr's shape"),
    ("heads mismatch", _with(q_lr=lambda t: t["q_lr"][:, :1], k_lr=lambda t: t["k_lr"][:, :1]), ValueError,
     "q_lr must have q's batch, heads and head_dim"),
    ("d mismatch", _with(q_lr=lambda t: t["q_lr"][..., :4], k_lr=lambda t: t["k_lr"][..., :4]), ValueError,
     "head_dim"),
    ("N != H*W", _with(hr_size=(4, 5)), ValueError, "hr_size=4x5 holds 20"),
    ("n != h*w", _with(lr_size=(3, 2), hr_size=(4, 6)), ValueError, "integer multiple"),
    ("lr tokens", _with(lr_size=(2, 2), hr_size=(4, 6)), ValueError, "lr_size=2x2 holds 4"),
    ("lr bigger than hr", _with(q=lambda t: t["q"][:, :, :6], k=lambda t: t["k"][:, :, :6],
                                v=lambda t: t["v"][:, :, :6], hr_size=(1, 6)), ValueError, "integer multiple"),
    ("non-integer sizes", _with(hr_size=(4.0, 6)), TypeError, "hr_size must hold integers"),
    ("zero size", _with(lr_size=(0, 3)), ValueError, "lr_size must be positive"),
    ("lam > 1", _with(lam=1.5), ValueError, r"lam must be in \[0.0, 1.0\]"),
    ("lam < 0", _with(lam=-0.1), ValueError, "lam must be in"),
    ("lam nan", _with(lam=float("nan")), ValueError, "lam must be in"),
    ("lam type", _with(lam="high"), TypeError, "lam must be a real number"),
    ("lam numeric string", _with(lam="0.5"), TypeError, "lam must be a real number"),
    ("lam bool", _with(lam=True), TypeError, "lam must be a real number"),
    ("lam inf", _with(lam=float("inf")), ValueError, "lam must be in"),
    ("scale bool", _with(scale=True), TypeError, "scale must be a positive real number"),
    ("scale string", _with(scale="0.1"), TypeError, "scale must be a positive real number"),
    ("scale inf", _with(scale=float("inf")), ValueError, "scale must be a positive finite"),
    ("backend list", _with(backend=["cpu"]), TypeError, r"backend must be a string.*\['cpu'\]"),
    ("scale", _with(scale=0.0), ValueError, "scale must be a positive finite"),
    ("dtype mix", _with(v=lambda t: t["v"].half()), TypeError, "v has dtype torch.float16"),
    ("int dtype", _with(q=lambda t: t["q"].int()), TypeError, "q must be float32, float16 or bfloat16"),
    ("mixed meta device", _with(k_lr=lambda t: t["k_lr"].to("meta")), ValueError, "k_lr is on meta"),
    ("not a tensor", _with(k=lambda t: t["k"].numpy()), TypeError, "k must be a torch.Tensor"),
    ("backend name", _with(backend="flash"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("tensors_kw,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_before_work(tensors_kw, exc, match, monkeypatch):
    tensors, kw = tensors_kw
    ran = []
    monkeypatch.setattr(am, "_am_attention_op", lambda *a, **k: ran.append(1))
    with pytest.raises(exc, match=match):
        fam_kernels.am_attention(**tensors, **kw)
    assert not ran


# --------------------------------------------------------------------------- dispatch

def _select(backend=None):
    return DISPATCHER.select(backend, "cpu", torch.float32, 64).name


def test_cpu_default_is_the_fast_kernel(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("FAM_KERNELS_BACKEND", raising=False)
    assert _select() == ("cpu" if EXTENSION_EXPECTED else "torch")


def test_env_var_and_argument_override(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert _select() == "torch"
    if EXTENSION_EXPECTED:
        assert _select("cpu") == "cpu"  # the argument wins over the environment


def test_explicit_unavailable_backend_is_refused_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        _select("triton")
    with pytest.raises(BackendNotSupportedError, match="needs CUDA tensors"):
        _select("cuda")


# --------------------------------------------------------------------------- registration

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    inputs = make_inputs(2, 2, (2, 3), (4, 6), 16, device=device)
    torch.library.opcheck(torch.ops.fam_kernels.am_attention.default,
                          (*inputs, 0.7, 4, 6, 2, 3, 0.25, backend))


def test_torch_compile_fullgraph_traces():
    lr, hr = (4, 4), (8, 8)
    inputs = make_inputs(1, 2, lr, hr, 32)

    def layer(q, k, v, q_lr, k_lr):
        return fam_kernels.am_attention(q * 2, k, v, q_lr, k_lr, lam=0.7, hr_size=hr, lr_size=lr) + 1

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))
