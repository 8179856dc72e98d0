"""ovfast's CPU kernels (``cpu_kernels.cpp``): built on first use, cached, loaded as torch ops.

The decode step on a CPU is a few GEMVs bound by reading the weights; torch's bf16 GEMV reads
them at about half the memory bandwidth, and every small op costs a dispatch. The kernels here
are compiled with the host's g++ against the installed torch (``-march=native``: the build is
for this CPU), once per (source, torch, compiler, CPU) into ``$OVFAST_CACHE/cpu-kernels/``, and
registered under ``torch.ops.ovfast_cpu``. Where they cannot be built (no compiler, another
architecture) or ``OVFAST_CPU_KERNELS=0``, ``available()`` is False and the ops run their torch
bodies: the same results within float rounding (tests/test_cpu_kernels.py holds them to it).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from ..settings import environment

log = logging.getLogger("ovfast")

SOURCES = (Path(__file__).with_name("cpu_kernels.cpp"), Path(__file__).with_name("cpu_block_cache.cpp"))
OPS = ("linear", "linear_gelu", "rms_norm", "rope", "silu_mul", "attention_decode", "attention_prefill",
       "attention_chunk")  # the ovfast.ops names implemented here
FLOATS = (torch.float32, torch.bfloat16)
SMALL_ROWS = 16  # up to this many rows a linear layer is a GEMV (decode); above, torch's GEMM wins
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _build(out: Path, cxx: str) -> None:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name, then renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w", "-ffp-contract=off",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *map(str, SOURCES), "-o", tmp,
           *[f"-L{p}" for p in libs], "-lc10", "-ltorch_cpu", *[f"-Wl,-rpath,{p}" for p in libs]]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{e.stderr[-2000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> bool:
    """Build (once per machine) and load the kernels; False, with one warning, when that fails."""
    if not environment.cpu_kernels() or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return False
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler (g++) found: the CPU decode runs on plain torch ops (slower)")
        return False
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), torch.__version__, version,
                                         _cpu_flags()]).encode())
        path = environment.cache_dir() / "cpu-kernels" / f"ovfast_cpu-{key.hexdigest()[:16]}.so"
        with _lock:
            if not path.exists():
                log.info("building ovfast's CPU kernels into %s (once per machine)", path)
                _build(path, cxx)
            torch.ops.load_library(str(path))
        return True
    except Exception as e:  # a failed build costs speed, never correctness
        log.warning("ovfast's CPU kernels could not be built (%s): the CPU decode runs on plain torch ops", e)
        return False


def available() -> bool:
    return _library()


BLOCK_CACHE_MIN_BYTES = 4 << 20  # below this torch's allocator serves as before (glibc reuses small blocks)


def keep_freed_blocks(limit_mb: int | None = None) -> bool:
    """Route torch's CPU allocations of 4 MiB and more through ovfast's block cache
    (``cpu_block_cache.cpp``): freed blocks are kept, up to ``limit_mb`` MiB (default
    ``OVFAST_CPU_BLOCK_CACHE_MB``, 2048), and handed out again instead of fresh pages, which a
    prefill otherwise faults in every layer. Process-wide, like any allocator; 0 empties the cache
    and sends allocations back to torch's allocator. Returns whether the cache is on (False where
    the kernels are not built: the allocator stays torch's). A CPU engine's load calls
    ``default_block_cache``, which keeps whatever this has set."""
    limit = environment.cpu_block_cache_mb() if limit_mb is None else limit_mb
    if limit < 0:
        raise ValueError(f"limit_mb must be >= 0, got {limit}")
    if not _library():
        return False
    with _lock:
        _block_cache["sized"] = True
        if limit == 0 and not _block_cache["installed"]:  # never installed: nothing to turn off
            return False
        torch.ops.ovfast_cpu.block_cache_configure(limit << 20, BLOCK_CACHE_MIN_BYTES)
        _block_cache["installed"], _block_cache["on"] = True, limit > 0
    return limit > 0


def default_block_cache() -> bool:
    """At a CPU engine's (or CPU tensor-parallel worker's) load: the block cache at
    ``OVFAST_CPU_BLOCK_CACHE_MB``, unless this process has sized it already (keep_freed_blocks,
    or an earlier engine). Returns whether it is on."""
    if _block_cache["sized"]:
        return _block_cache["on"]
    return keep_freed_blocks()


# installed: it stays installed once it is (limit 0 passes everything through); sized: the limit
# was set by keep_freed_blocks; on: the limit is above 0
_block_cache = {"installed": False, "sized": False, "on": False}


def block_cache_stats() -> dict:
    """The block cache's counters: bytes cached (free, kept) and in use, hits, misses, blocks cached."""
    keys = ("cached_bytes", "used_bytes", "hits", "misses", "cached_blocks")
    values = torch.ops.ovfast_cpu.block_cache_stats() if _library() else [0] * len(keys)
    return dict(zip(keys, values))


# Each op takes its ovfast.ops signature and runs the torch reference for what the kernel does not
# cover (other dtypes, layouts or shapes), so routing an op here never changes what it accepts.


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the GEMV kernel for a few rows of fp32 or bf16; past that, oneDNN on the
    weight's packed copy where it has one (``pack_weights``); else a bf16 GEMM with a bias adds it
    in oneDNN's epilogue (``_onednn_epilogue``)."""
    if (x.dim() == 2 and x.shape[0] <= SMALL_ROWS and x.dtype in FLOATS and weight.dtype == x.dtype
            and weight.is_contiguous() and (bias is None or bias.dim() == 1) and _library()):
        return torch.ops.ovfast_cpu.small_linear(x, weight, bias)
    onednn = _onednn_weight(x, weight, bias)
    if onednn is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), onednn, bias, "none", [], "")
    if bias is None and _wide_bf16_gemm(x, weight):
        # Two GEMMs, each on half the weight's rows, writing the two halves of one output.
        half = weight.shape[0] // 2
        out = x.new_empty(x.shape[0], weight.shape[0])
        torch.mm(x, weight[:half].t(), out=out[:, :half])
        torch.mm(x, weight[half:].t(), out=out[:, half:])
        return out
    return F.linear(x, weight, bias)


WIDE_COLUMNS = 8192


def _wide_bf16_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A bf16 GEMM wider than WIDE_COLUMNS outputs, run as two halves. oneDNN's bf16 GEMM (torch
    2.13, AMX, 2 threads) runs the 0.5B model's fused gate/up projection (2,948 x 9,728 x 896) at
    0.8 of its rate at other widths, and as two GEMMs of 4,864 columns at the usual rate (interleaved
    runs: 0.72-0.77 of the time); widths of 8,192-16,384 and the 7B's 37,888 x 3,584 were level
    either way. fp32 (MKL) was level, so it stays one call."""
    return (x.dtype == torch.bfloat16 and weight.dtype == x.dtype and x.dim() == 2 and x.shape[0] > SMALL_ROWS
            and weight.shape[0] > WIDE_COLUMNS and weight.shape[0] % 128 == 0 and x.is_contiguous()
            and weight.is_contiguous() and onednn_bf16()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "none") -> torch.Tensor:
    """SigLIP's fc1 and its tanh gelu. bf16 (with a bias, past SMALL_ROWS): the bias and the
    activation run in oneDNN's epilogue on the fp32 accumulator, rounded once. fp32: the
    activation runs vectorised (torch's gelu is several times slower) with the bias added inside
    its pass instead of by addmm, which first broadcast-copies it into the whole (tokens, 4304)
    output (16 ms of a 150 ms layer at 3,645 tokens)."""
    if approximate != "tanh" or x.dtype not in FLOATS or not _library():
        return F.gelu(linear(x, weight, bias), approximate=approximate)
    onednn = _onednn_weight(x, weight, bias) if bias is not None and x.dtype == torch.bfloat16 else None
    if onednn is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), onednn, bias, "gelu", [], "tanh")
    if (bias is not None and x.dim() == 2 and x.shape[0] > SMALL_ROWS and weight.dtype == x.dtype
            and bias.dtype == x.dtype and bias.dim() == 1 and bias.is_contiguous()):
        y = linear(x, weight)  # on the packed copy where there is one
        torch.ops.ovfast_cpu.bias_gelu_tanh_(y, bias)
        return y
    return torch.ops.ovfast_cpu.gelu_tanh(linear(x, weight, bias))


# --- weights packed for oneDNN's GEMMs -------------------------------------------------------------
# A prompt's GEMMs (vision tiles, prefill chunks) are compute-bound. oneDNN runs them fastest on
# its own blocked copy of the weight, made once (what vLLM's CPU backend and Inductor's CPU
# freezing do): on the 2-core AMD EPYC (Zen 4) VM, fp32, against torch's GEMM (MKL) on the weight
# as loaded: SigLIP's 3,645 x 1,152 x 4,304 183 -> 198 GFLOP/s, the decoder's 1,024-row gate/up
# 163 -> 193 and down 198 -> 219. The plain weights stay: the decode step's GEMV reads them, and
# anything not packed runs as before. Copies are looked up by the weight tensor itself and die
# with it.

PACK_ROWS_HINT = 1024  # oneDNN picks the blocking for this many rows; any row count runs on it
_packed: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def packing_available(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN can pack weights of ``dtype`` and run GEMMs on them here."""
    mkldnn = torch.ops.mkldnn
    if dtype not in FLOATS or not torch.backends.mkldnn.is_available():
        return False
    if not (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or onednn_bf16()


def pack_weights(weights, limit_mb: int | None = None) -> int:
    """Make oneDNN's blocked copy of each of ``weights`` (2-D, fp32 or bf16, contiguous), in order,
    while their total stays within ``limit_mb`` MiB (default ``OVFAST_CPU_PACKED_WEIGHTS_MB``,
    4096); ``linear`` and ``linear_gelu`` use a copy for more than SMALL_ROWS rows. The copies are
    extra memory (the plain weights stay). Returns the bytes of all live copies of ``weights``."""
    limit = (environment.cpu_packed_weights_mb() if limit_mb is None else limit_mb) << 20
    total = 0
    for w in weights:
        size = w.numel() * w.element_size()
        if _packed_copy(w) is not None:
            total += size
            continue
        if (total + size > limit or w.dim() != 2 or not w.is_contiguous() or w.device.type != "cpu"
                or w.requires_grad or not packing_available(w.dtype)):
            continue
        key = id(w)
        _packed[key] = (weakref.ref(w), torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT))
        weakref.finalize(w, _packed.pop, key, None)
        total += size
    return total


def packed_weight_bytes() -> int:
    """Bytes of the weights that have a live packed copy (the copies take about as much again)."""
    return sum(w.numel() * w.element_size() for ref, _ in list(_packed.values()) if (w := ref()) is not None)


def _packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _packed.get(id(weight))
    return entry[1] if entry is not None and entry[0]() is weight else None


def _onednn_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """What oneDNN's linear takes for this GEMM (bias, and activation, in its epilogue): the
    weight's packed copy where it has one, else the weight itself for a bf16 GEMM with a bias
    (``_onednn_epilogue``); None where the GEMM stays torch's."""
    packed = _packed_for(x, weight, bias)
    if packed is not None:
        return packed
    return weight if bias is not None and _onednn_epilogue(x, weight, bias) else None


def _packed_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The packed copy of ``weight`` where a GEMM of ``x`` may run on it: more than SMALL_ROWS
    rows of its dtype, a matching 1-D bias, and no autograd (oneDNN's linear has no backward)."""
    if not _packed or x.dim() != 2 or x.shape[0] <= SMALL_ROWS or x.dtype != weight.dtype:
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1 or not bias.is_contiguous()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    return _packed_copy(weight)


@functools.cache
def onednn_bf16() -> bool:
    """Whether torch's oneDNN runs bf16 GEMMs here (and has the fused-epilogue linear)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported()))


def _onednn_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """A bf16 GEMM (past SMALL_ROWS) whose bias, and activation, oneDNN applies to the fp32
    accumulator as it stores the tile: torch's addmm first broadcast-copies the bias into the
    whole output (SigLIP at 3,645 tokens: 10-20% of the qkv, out and fc2 GEMMs), then the GEMM adds
    onto it; the bias alone is the same result, bit for bit. Unpacked fp32 stays on torch's GEMM (MKL),
    whose order transformers' reference shares."""
    return (x.dtype == torch.bfloat16 and weight.dtype == x.dtype and bias.dtype == x.dtype and x.dim() == 2
            and x.shape[0] > SMALL_ROWS and x.is_contiguous() and weight.is_contiguous() and bias.dim() == 1
            and bias.is_contiguous() and onednn_bf16()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)))


# rms_norm, rope and silu_mul: one pass each where torch makes several (a prefill chunk of 2,948
# rows, fp32: rms_norm with its residual 4.5 ms against 16, silu_mul 33 against 59), and on a
# decode step's few rows one call where torch makes several dispatches.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if (x.dim() == 2 and x.dtype in FLOATS and x.is_contiguous() and weight.dtype == x.dtype and weight.is_contiguous()
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape and residual.is_contiguous()))
            and _library()):
        out, total = torch.ops.ovfast_cpu.rms_norm(x, weight, eps, residual)
        return out if residual is None else (out, total)
    return _torch_ops().rms_norm.reference(x, weight, eps, residual)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if (q.dtype in FLOATS and k.dtype == q.dtype and q.dim() == 3 and k.dim() == 3 and q.stride(-1) == 1
            and k.stride(-1) == 1 and positions.dtype == torch.long and positions.is_contiguous()
            and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous() and _library()):
        torch.ops.ovfast_cpu.rope(q, k, positions, cos_sin_cache)
        return
    _torch_ops().rope.reference(q, k, positions, cos_sin_cache)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() == 2 and gate_up.dtype in FLOATS and gate_up.is_contiguous() and _library():
        return torch.ops.ovfast_cpu.silu_mul(gate_up)
    return _torch_ops().silu_mul.reference(gate_up)


# Prompt attention (prefill chunks, and SigLIP's tiles): the two products as GEMMs per (sequence,
# kv head, block of queries) with vectorised exponentials between them. With AVX-512, K^T and V
# packed once and both products on one register-tiled micro-kernel: fp32 FMAs, bf16 AVX512-BF16's
# pair dot products (the scores in fp32), or AMX (torch's brgemm micro-kernels). On the AMD EPYC
# (Zen 4) VM, 2 threads, a layer of the 0.5B model's 2,948-token causal prompt: fp32 91-96 ms
# against 100-106 on torch's GEMMs, bf16 49 ms; SigLIP's five 729-token tiles (head_dim 72): fp32
# 84-109 ms against torch's fp32 flash kernel's 96-109, bf16 41 against 89. On AMX (Intel Xeon)
# bf16: the tiles in 28-33 ms against torch's 36-49, the causal chunk in 28 against 34. Without
# AVX-512 the kernel is fp32 on torch's GEMMs and takes causal prompts only (tiles stay on
# torch's flash kernel, faster there).


@functools.cache
def prompt_attention_tiles() -> bool:
    """Whether the prompt-attention kernel is the register-tiled one here (an AVX-512 build)."""
    return _library() and bool(torch.ops.ovfast_cpu.prompt_attention_tiles())


@functools.cache
def bf16_prompt_attention() -> bool:
    """Whether the prompt-attention kernel takes bf16 here (built, and AMX or AVX512-BF16)."""
    return _library() and bool(torch.ops.ovfast_cpu.bf16_prompt_attention())


def _prompt_attention_dtype(q: torch.Tensor) -> bool:
    """The prompt-attention kernel takes fp32, or bf16 (an even head size) where the CPU runs it."""
    if q.dtype == torch.bfloat16:
        return q.shape[-1] % 2 == 0 and bf16_prompt_attention()
    return q.dtype == torch.float32


def _prompt_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q, k, v as the kernel takes them."""
    return (_prompt_attention_dtype(q) and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 3 and k.dim() == 3
            and v.shape == k.shape and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and q.shape[1] % k.shape[1] == 0 and _library())


def _widened_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """bf16 prompt attention on a CPU without AMX or AVX512-BF16 runs in fp32 on the widened
    inputs, rounded once at the end: torch's bf16 flash kernel was slower than the fp32 route
    even on an AVX512-BF16 machine (3.7 s of a 2,948-token 0.5B prompt's attention in bf16, 2.4 s
    widened). More exact, too."""
    return (q.dtype == torch.bfloat16 and k.dtype == q.dtype and v.dtype == q.dtype and q.device.type == "cpu"
            and _library() and not bf16_prompt_attention())


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      causal: bool = True, scale: float | None = None) -> torch.Tensor:
    if _widened_bf16(q, k, v):
        return attention_prefill(q.float(), k.float(), v.float(), cu_seqlens, max_seqlen, causal, scale).to(q.dtype)
    if not _prompt_attention_fits(q, k, v) or not (causal or q.dtype == torch.bfloat16 or prompt_attention_tiles()):
        return _torch_ops().attention_prefill.reference(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    if len({b - a for a, b in zip(bounds, bounds[1:])}) == 1:  # equal lengths: one call
        return torch.ops.ovfast_cpu.prompt_attention(q, k, v, len(bounds) - 1, causal, s)
    out = torch.empty(q.shape, dtype=q.dtype)
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            out[a:b] = torch.ops.ovfast_cpu.prompt_attention(q[a:b], k[a:b], v[a:b], 1, causal, s)
    return out


def attention_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    start: int, scale: float | None = None) -> torch.Tensor:
    widen = _widened_bf16(q, k_cache, v_cache)  # only the gathered pages are widened
    if not widen and not (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype and q.dim() == 3
                          and q.stride(-1) == 1 and _prompt_attention_dtype(q) and _library()):
        return _torch_ops().attention_chunk.reference(q, k_cache, v_cache, block_table, start, scale)
    k, v = _torch_ops().gather_pages(k_cache, v_cache, block_table[None], start + q.shape[0])
    s = q.shape[-1] ** -0.5 if scale is None else scale
    if widen:
        return torch.ops.ovfast_cpu.prompt_attention(q.float(), k[0].float(), v[0].float(), 1, True, s).to(q.dtype)
    return torch.ops.ovfast_cpu.prompt_attention(q, k[0], v[0], 1, True, s)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    if (q.dtype in FLOATS and q.dim() == 3 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.dtype == torch.int32
            and block_tables.stride(-1) == 1 and seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
            and _library()):
        s = q.shape[-1] ** -0.5 if scale is None else scale
        return torch.ops.ovfast_cpu.attention_decode(q, k_cache, v_cache, block_tables, seq_lens, s)
    return _torch_ops().attention_decode.reference(q, k_cache, v_cache, block_tables, seq_lens, scale)


def decode_layers(layers, h: torch.Tensor, batch, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every decoder layer of a decode step in one call (``Qwen2DecoderLayer`` modules ``layers``,
    one rank's whole model), or None where the kernel does not apply and the layers must run one
    by one: the same ops in the same order, so the result is the per-op path's, bit for bit."""
    first = layers[0]
    if not (h.dtype in FLOATS and h.dim() == 2 and h.is_contiguous() and k_cache.dtype == h.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and batch.block_tables.dtype == torch.int32
            and batch.block_tables.stride(-1) == 1 and batch.seq_lens.is_contiguous()
            and batch.positions.is_contiguous() and h.shape[0] <= SMALL_ROWS and _library()):
        return None
    w = [(x.input_layernorm, x.qkv_weight, x.qkv_bias, x.o_weight, x.post_attention_layernorm, x.gate_up_weight,
          x.down_weight) for x in layers]
    if any(t.dtype != h.dtype or not t.is_contiguous() for ws in w for t in ws):
        return None
    ln1, qkv_w, qkv_b, o_w, ln2, gate_up_w, down_w = (list(c) for c in zip(*w))
    return torch.ops.ovfast_cpu.decode_layers(
        h, ln1, qkv_w, qkv_b, o_w, ln2, gate_up_w, down_w, k_cache, v_cache, batch.positions,
        batch.slot_mapping, batch.block_tables, batch.seq_lens, cos_sin, first.heads, first.kv_heads,
        first.cfg.rms_norm_eps)


def _torch_ops():
    from . import torch_ops  # (imported late: torch_ops -> backends -> here)

    return torch_ops
