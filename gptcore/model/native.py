"""Native kernels for decoding a few rows on a CPU (``head_top.c``, ``decode_rows.c``).

Decoding a few rows spends most of a step in the LM head and in selecting each row's top
logits from it (docs/generation.md, "Selecting a row's top"). ``head_top.c`` streams the
head once for up to 8 rows and selects exactly; ``decode_rows.c`` runs every block of a
step in one call (each row attending over its own cached positions), with the same
arithmetic for a row whatever the other rows are. Plain C; this module builds both with the
machine's C compiler the first time they are needed, caches the library, and calls it
through ctypes (which releases the GIL for the call).

Optional by design: without a compiler, when the build or its self-check fails, or with
``GPTCORE_NATIVE=0``, :func:`library` returns None and decoding uses PyTorch alone (every
path gives the same tokens; this one is faster). ``status()`` says which and why.

The library is cached in ``$GPTCORE_CACHE_DIR`` (default ``~/.cache/gptcore``) under a
name that hashes the source, the compiler's version, the flags and the CPU's feature
flags: ``-march=native`` code is only ever loaded on the kind of CPU it was built for.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("head_top.c"), Path(__file__).with_name("decode_rows.c"))
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=gnu11", "-shared", "-fPIC"]
CHUNK = 256  # head_top.c's CHUNK: ids per call of its tile loop, and the padding of the vocabulary
SUPER = 64   # head_top.c's SUPER: vocabulary rows stored together
WIDTH = 16   # decode_rows.c's WIDTH: output columns a panel of a linear layer's weights holds
HEAD_SIZES = (8, 16, 32, 64, 128)  # the head sizes rows_attend takes

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("GPTCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gptcore")
    return Path(root) / "native"


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("GPTCORE_NATIVE", "1") == "0":
        return None, "off (GPTCORE_NATIVE=0)"
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return None, f"not built on {platform.system()}"
    cc = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    try:
        source = b"\0".join(path.read_bytes() for path in SOURCES)
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"no C compiler ({' '.join(cc)}: {e})"
    digest = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                        _cpu_flags().encode()])).hexdigest()[:16]
    directory = _cache_dir()
    path = directory / f"kernels-{digest}.so"
    if not path.exists():
        tmp = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
            os.close(fd)
            result = subprocess.run([*cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
                return None, f"build failed ({' '.join(cc)}): {reason}"
            os.chmod(tmp, 0o755)  # mkstemp's 0600: a cache shared between users must stay loadable
            os.replace(tmp, path)  # atomic: a process beside this one loads a whole library or builds its own
            tmp = None
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"build failed: {e}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"load failed: {e}"
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.head_top.argtypes = [p, i64, i32, p, i64, i64, i64, i32, p, p, p]
    lib.head_top.restype = i32
    lib.head_dense.argtypes = [p, i64, i32, p, i64, i64, p, i64]
    lib.head_dense.restype = i32
    lib.head_top_work.argtypes = [i64, i64]
    lib.head_top_work.restype = i64
    lib.rows_linear.argtypes = [p, i64, i64, p, i64, p, p]
    lib.rows_linear.restype = i32
    lib.rows_attend.argtypes = [p, i64, p, i64, i32, i64, i32, p, i64, ctypes.c_float, p, i64, p]
    lib.rows_attend.restype = i32
    lib.rows_step.argtypes = [p, i64, i64, i32, i64, i64, i32, p, p, p, p, i32, ctypes.c_float, p]
    lib.rows_step.restype = i32
    lib.rows_step_work.argtypes = [i64, i64, i64, i64]
    lib.rows_step_work.restype = i64
    try:
        problem = _self_check(lib)
    except Exception as e:  # noqa: BLE001 - any failure of a fresh build means: decode without it
        problem = f"{type(e).__name__}: {e}"
    if problem:
        return None, f"self-check failed: {problem}"
    return lib, f"built ({path})"


def library() -> ctypes.CDLL | None:
    """The kernel library, built and checked once per process; None where it can't be."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["status"] = _build()
        return _state["lib"]


def status() -> str:
    """Why :func:`library` is what it is: "built (path)", "off (...)", "no C compiler ...", ..."""
    library()
    return _state["status"]


def pack(head: torch.Tensor) -> torch.Tensor:
    """The (V, C) fp32 head as the kernel reads it: vocabulary rows in blocks of SUPER,
    each block (C, SUPER) row-major, zero rows padding V to a multiple of CHUNK."""
    vocab, width = head.shape
    padded = -(-vocab // CHUNK) * CHUNK
    w = torch.zeros(padded, width, dtype=torch.float32)
    w[:vocab] = head.detach().to(device="cpu", dtype=torch.float32)
    return w.view(padded // SUPER, SUPER, width).transpose(1, 2).contiguous()


class NativeHead:
    """One LM head's top logits through the kernel: ``top(x, k)`` for rows x (rows, C)."""

    def __init__(self, lib: ctypes.CDLL, head: torch.Tensor) -> None:
        self.lib = lib
        self.vocab, self.width = head.shape
        self.packed = pack(head)
        self.padded = self.packed.numel() // self.width
        self.work = torch.empty(lib.head_top_work(0, self.padded), dtype=torch.uint8)
        # One workspace per head (decoders of one model share the head): the GIL is released
        # during a call, so two threads decoding the same model take turns.
        self.lock = threading.Lock()

    def top(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's exact top ``k`` logits and their ids (rows, k), in order: value
        descending, then id ascending (``k`` <= the vocabulary). NaN logits are never
        selected (torch's topk would rank them first: a model that makes them is broken
        either way)."""
        x = x.detach().to(torch.float32).contiguous()
        rows = x.size(0)
        values = torch.empty(rows, k, dtype=torch.float32)
        ids = torch.empty(rows, k, dtype=torch.int64)
        with self.lock:
            rc = self.lib.head_top(x.data_ptr(), rows, self.width, self.packed.data_ptr(), 0, self.padded,
                                   self.vocab, k, values.data_ptr(), ids.data_ptr(), self.work.data_ptr())
        if rc != 0:
            raise RuntimeError(f"head_top rejected its arguments (rows {rows}, k {k}): rc {rc}")
        return values, ids

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every logit (rows, vocab), the same arithmetic as :meth:`top`."""
        x = x.detach().to(torch.float32).contiguous()
        out = torch.empty(x.size(0), self.padded, dtype=torch.float32)
        rc = self.lib.head_dense(x.data_ptr(), x.size(0), self.width, self.packed.data_ptr(), 0, self.padded,
                                 out.data_ptr(), self.padded)
        if rc != 0:
            raise RuntimeError(f"head_dense rejected its arguments: rc {rc}")
        return out[:, :self.vocab]


class _Layer(ctypes.Structure):
    """decode_rows.c's struct rows_layer: one block's pointers."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "ln_1_w", "ln_1_b", "attn_w", "attn_b", "attn_proj_w", "attn_proj_b",
        "ln_2_w", "ln_2_b", "fc_w", "fc_b", "mlp_proj_w", "mlp_proj_b", "kv")]


STEP_RMSNORM, STEP_QK_NORM, STEP_RELU2 = 1, 2, 4  # decode_rows.c's rows_step flags


class NativeRows:
    """A decoding step's linear layers and attention for a few rows (``decode_rows.c``):
    each row's result is the same arithmetic in the same order whatever the other rows
    are, so it has the same bits alone and beside them, at any positions."""

    def __init__(self, lib: ctypes.CDLL, block: int) -> None:
        self.lib = lib
        self.work = torch.empty(block + 8, dtype=torch.float32)  # one head's scores: per decoder, one thread

    @staticmethod
    def pack(w: torch.Tensor) -> torch.Tensor:
        """A linear layer's (in, out) weight as ``linear`` reads it: out / WIDTH panels,
        each (in, WIDTH) row-major (out a multiple of WIDTH)."""
        k, n = w.shape
        if n % WIDTH:
            raise ValueError(f"a linear layer of {n} outputs: the row kernels take multiples of {WIDTH}")
        return w.detach().float().reshape(k, n // WIDTH, WIDTH).transpose(0, 1).contiguous()

    def blocks(self, layers: list[dict], kv: list[torch.Tensor], *, rms: bool, qk_norm: bool, relu2: bool,
               eps: float) -> None:
        """Set the model's blocks for :meth:`step`: per layer a dict of rows_layer's fields
        (matrices from :meth:`pack`, fp32 vectors, ln biases may be None) and its KV cache
        (slots, 2, nh, block, hs). The tensors must outlive the calls (the decoder holds them)."""
        for tensors in layers:
            if not _plain(*(t for t in tensors.values() if t is not None)):
                raise ValueError("rows_step: every weight must be a contiguous fp32 CPU tensor")
        for cache in kv:
            if cache.dim() != 5 or cache.size(1) != 2 or not _plain(cache):
                raise ValueError(f"rows_step: a KV cache of shape {tuple(cache.shape)}; want (slots, 2, nh, block, hs)")
        self.layers = (_Layer * len(layers))(*(
            _Layer(**{k: (None if t is None else t.data_ptr()) for k, t in tensors.items()}, kv=cache.data_ptr())
            for tensors, cache in zip(layers, kv)))
        self.n_layer, self.slots = len(layers), kv[0].size(0)
        self.nh, self.block, self.hs = kv[0].size(2), kv[0].size(3), kv[0].size(4)
        self.hidden = layers[0]["fc_w"].size(0) * WIDTH
        self.flags = STEP_RMSNORM * rms | STEP_QK_NORM * qk_norm | STEP_RELU2 * relu2
        self.eps = eps
        c = self.nh * self.hs
        self.step_work = torch.empty(self.lib.rows_step_work(self.slots, c, self.hidden, self.block) // 4 + 1)

    def step(self, x: torch.Tensor, positions: list[int], cos: torch.Tensor | None = None,
             sin: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream ``x`` (rows, C) after the embeddings through every block
        set by :meth:`blocks`, in place: row r in cache slot r at ``positions[r]`` (its key
        and value written there). ``cos``/``sin`` (rows, hs/2): rotary angles, or None."""
        rows, c = x.shape
        if c != self.nh * self.hs or rows > self.slots or len(positions) != rows or not _plain(x) or (
                cos is not None and (cos.shape != (rows, self.hs // 2) or sin.shape != cos.shape
                                     or not _plain(cos, sin))):
            raise ValueError(f"rows_step: x {tuple(x.shape)} for {self.slots} slots of width {self.nh * self.hs}, "
                             f"{len(positions)} positions, cos {None if cos is None else tuple(cos.shape)}")
        pos = (ctypes.c_int64 * rows)(*positions)
        rc = self.lib.rows_step(x.data_ptr(), rows, c, self.nh, self.block, self.hidden, self.n_layer, self.layers,
                                pos, None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
                                self.flags, self.eps, self.step_work.data_ptr())
        if rc != 0:
            raise RuntimeError(f"rows_step rejected its arguments (positions {positions}): rc {rc}")
        return x

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (rows, in) @ the packed weight + bias: (rows, out). x must be contiguous fp32."""
        rows, k = x.shape
        n = packed.size(0) * WIDTH
        # The kernel trusts its pointers: shapes are checked here, where a mistake is an error.
        if packed.shape[1:] != (k, WIDTH) or not _plain(packed, x) or (
                bias is not None and (bias.shape != (n,) or not _plain(bias))):
            raise ValueError(f"rows_linear: x {tuple(x.shape)}, packed {tuple(packed.shape)} (want (n/{WIDTH}, "
                             f"{k}, {WIDTH}) contiguous), bias {None if bias is None else tuple(bias.shape)}")
        y = torch.empty(rows, n, dtype=torch.float32)
        rc = self.lib.rows_linear(x.data_ptr(), rows, k, packed.data_ptr(), n,
                                  None if bias is None else bias.data_ptr(), y.data_ptr())
        if rc != 0:
            raise RuntimeError(f"rows_linear rejected its arguments ({rows} x {k} -> {n}): rc {rc}")
        return y

    def attend(self, q: torch.Tensor, kv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Row r's query ``q[r]`` (nh, hs) (rows may be strided, as slices of a fused QKV),
        over the first ``lengths[r]`` positions of its cache ``kv[r]`` (2, nh, block, hs):
        softmax(q k / sqrt(hs)) v, (rows, nh * hs)."""
        rows, nh, hs, block = q.size(0), kv.size(-3), kv.size(-1), kv.size(-2)
        if q.dim() != 3 or kv.dim() != 5 or q.shape[1:] != (nh, hs) or kv.size(0) < rows or kv.size(1) != 2 \
                or len(lengths) != rows or kv[0].stride() != (nh * block * hs, block * hs, hs, 1) \
                or not _plain(q, contiguous=False) or not _plain(kv, contiguous=False) or self.work.numel() < block + 8:
            raise ValueError(f"rows_attend: q {tuple(q.shape)}, kv {tuple(kv.shape)}, {len(lengths)} lengths")
        if q.stride(2) != 1 or q.stride(1) != hs:
            q = q.contiguous()
        n = (ctypes.c_int64 * rows)(*lengths)
        y = torch.empty(rows, nh * hs, dtype=torch.float32)
        rc = self.lib.rows_attend(q.data_ptr(), q.stride(0), kv.data_ptr(), kv.stride(0), nh, block, hs, n, rows,
                                  hs ** -0.5, y.data_ptr(), nh * hs, self.work.data_ptr())
        if rc != 0:
            raise RuntimeError(f"rows_attend rejected its arguments (head size {hs}, lengths {lengths}): rc {rc}")
        return y


def _plain(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """fp32 on the CPU (and contiguous): what the C code's pointers assume."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and (t.is_contiguous() or not contiguous)
               for t in tensors)


def _attention_reference(q: torch.Tensor, kv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """softmax(q k / sqrt(hs)) v per row over its own positions, in float64: (rows, nh * hs)."""
    out = []
    for r, n in enumerate(lengths):
        qr, k, v = q[r].double(), kv[r, 0, :, :n].double(), kv[r, 1, :, :n].double()  # (nh, hs), (nh, n, hs)
        weights = torch.softmax((k @ qr.unsqueeze(-1)).squeeze(-1) / qr.size(-1) ** 0.5, dim=-1)
        out.append((weights.unsqueeze(1) @ v).reshape(-1))
    return torch.stack(out)


def _self_check(lib: ctypes.CDLL) -> str | None:
    """Check a fresh build on random rows against float64 products and a sorted
    reference (a compiler that mis-built the vector code must not decode): None or what
    was wrong."""
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(700, 48, generator=gen) * 0.1
    head[5] = head[9]  # equal logits: the lower id first
    kernel = NativeHead(lib, head)
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, 48, generator=gen)
        dense = kernel.dense(x)
        exact = x.double() @ head.double().t()
        if not bool(((dense.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()):
            return f"logits differ from float64 products ({rows} rows)"
        values, ids = kernel.top(x, 40)
        for r in range(rows):
            order = sorted(range(head.size(0)), key=lambda i: (-float(dense[r, i]), i))[:40]
            if ids[r].tolist() != order or not torch.equal(values[r], dense[r, order]):
                return f"top 40 differs from a sorted reference (row {r} of {rows})"
    kernels = NativeRows(lib, block=40)
    weight, bias = torch.randn(48, 80, generator=gen) * 0.1, torch.randn(80, generator=gen)
    packed = kernels.pack(weight)
    kv = torch.randn(9, 2, 2, 40, 16, generator=gen)
    for rows in (1, 3, 5, 9):
        x = torch.randn(rows, 48, generator=gen)
        y = kernels.linear(x, packed, bias)
        exact = x.double() @ weight.double() + bias.double()
        if not bool(((y.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()):
            return f"linear layer differs from float64 products ({rows} rows)"
        q, lengths = torch.randn(rows, 2, 16, generator=gen), [1 + (7 * r) % 40 for r in range(rows)]
        att = kernels.attend(q, kv[:rows], lengths)
        if not bool(((att.double() - _attention_reference(q, kv, lengths)).abs() <= 1e-5).all()):
            return f"attention differs from a float64 softmax ({rows} rows)"
    return None


if __name__ == "__main__":  # python -m gptcore.model.native: build now and say how it went
    print(status())
    sys.exit(0 if library() is not None else 1)
