"""The native decoding kernels (gptcore/model/head_top.c and decode_rows.c through
native.py): built with the machine's C compiler, they must give what the PyTorch paths
give (exactly for the head's top, to fp32 rounding for the blocks), a row the same bits
alone and beside other rows, and decoding must work the same without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from test_generate import BLOCK, assert_exact_tops, expected_top, tiny_model, tops_beside_full

from gptcore.config import GPTConfig
from gptcore.generation.engine import Engine
from gptcore.generation.generate import SamplingConfig, generate_ids
from gptcore.model import GPT, native
from gptcore.model.decode import CachedDecoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lib():
    """The library: CI machines have a C compiler, so it must build there (a build that
    fails where a compiler exists is a bug, not a reason to skip)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.fail("no C compiler on this machine: the native head can't be tested (CI images have cc)")
    lib = native.library()
    assert lib is not None, native.status()
    return lib


def reference(dense: torch.Tensor, top: int) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's first ``top`` by value, then id: a stable descending sort keeps equal
    values (-0.0 and 0.0 among them) in id order; the brute-force sort checks that."""
    values, ids = dense.sort(dim=-1, descending=True, stable=True)
    if dense.size(-1) <= 1000:
        assert ids[:, :top].tolist() == [expected_top(row, top) for row in dense]
    return ids[:, :top].tolist(), values[:, :top]


@pytest.mark.parametrize("vocab,width", [(66, 32), (700, 48), (50257, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
def test_top_is_the_sorted_top_of_its_logits_and_those_are_fp32_products(lib, vocab, width, rows):
    """For every row count (the kernel has a register tile per count up to 8, and groups
    of 8 beyond), vocabularies that end mid-block and mid-chunk, and top 1 to 200: the
    ids and values are exactly the first ``top`` of the row's logits sorted by value, then
    id; the logits equal float64 products to fp32 rounding."""
    gen = torch.Generator().manual_seed(vocab + rows)
    head = torch.randn(vocab, width, generator=gen) * 0.3
    kernel = native.NativeHead(lib, head)
    x = torch.randn(rows, width, generator=gen)
    dense = kernel.dense(x)
    exact = x.double() @ head.double().t()
    assert ((dense.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()
    for top in (1, 5, 65, 200):
        if top >= vocab:
            continue
        values, ids = kernel.top(x, top)
        want_ids, want_values = reference(dense, top)
        assert ids.tolist() == want_ids
        assert torch.equal(values, want_values)


def test_ties_zeros_and_signed_zeros_order_by_id(lib):
    """Equal logits (duplicated rows, all-zero rows, and -0.0 against 0.0) rank by id,
    lowest first, across block and chunk boundaries, as exact_top orders them."""
    gen = torch.Generator().manual_seed(3)
    head = torch.randn(1000, 16, generator=gen)
    head[300:700] = 0.0            # 400 logits of exactly 0 (some -0.0 below)
    head[900] = head[950] = head[10] = head[5]
    x = torch.randn(3, 16, generator=gen)
    x[2] = 0.0                     # a row whose every logit is +-0: the lowest ids win
    head[320] = -0.0 * head[320]
    kernel = native.NativeHead(lib, head)
    dense = kernel.dense(x)
    for top in (1, 7, 300, 640):
        values, ids = kernel.top(x, top)
        want_ids, want_values = reference(dense, top)
        assert ids.tolist() == want_ids
        assert torch.equal(values, want_values)
    assert kernel.top(x, 5)[1][2].tolist() == [0, 1, 2, 3, 4]


def test_a_nan_logit_is_skipped_without_hiding_its_neighbours(lib):
    """A NaN logit is never selected, and the real logits in its block and vector lane
    still are (a NaN must not become a block's maximum)."""
    gen = torch.Generator().manual_seed(8)
    head = torch.randn(2048, 8, generator=gen) * 0.01
    head[64] = float("nan")
    head[72] = 10.0                      # same block and lane as the NaN, by far the largest
    kernel = native.NativeHead(lib, head)
    x = torch.ones(1, 8)
    values, ids = kernel.top(x, 5)
    dense = kernel.dense(x)[0]
    finite = torch.where(dense.isnan(), torch.tensor(float("-inf")), dense)
    assert ids[0].tolist() == expected_top(finite, 5) and ids[0, 0] == 72
    assert not values.isnan().any()


def test_threads_sharing_a_head_take_turns(lib):
    """Decoders of one model share its NativeHead and its workspace; ctypes releases the
    GIL, so two threads calling it at once must still each get their own rows' answer."""
    gen = torch.Generator().manual_seed(2)
    kernel = native.NativeHead(lib, torch.randn(20000, 64, generator=gen))
    xs = [torch.randn(3, 64, generator=gen) for _ in range(2)]
    want = [kernel.top(x, 50) for x in xs]
    wrong = []

    def work(i):
        for _ in range(40):
            got = kernel.top(xs[i], 50)
            if not (torch.equal(got[0], want[i][0]) and torch.equal(got[1], want[i][1])):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_a_row_gets_the_same_bits_alone_and_in_any_batch(lib):
    """Each logit is one dot product summed in one order, whatever the tile: a row's top
    values are bit-identical alone, in a batch of 8 and in a batch of 13."""
    gen = torch.Generator().manual_seed(5)
    head = torch.randn(5000, 64, generator=gen)
    kernel = native.NativeHead(lib, head)
    x = torch.randn(13, 64, generator=gen)
    batch13 = kernel.top(x, 50)
    batch8 = kernel.top(x[:8].contiguous(), 50)
    for r in range(13):
        alone = kernel.top(x[r:r + 1].contiguous(), 50)
        assert torch.equal(alone[0][0], batch13[0][r]) and torch.equal(alone[1][0], batch13[1][r])
        if r < 8:
            assert torch.equal(alone[0][0], batch8[0][r]) and torch.equal(alone[1][0], batch8[1][r])


@pytest.mark.parametrize("top", [1, 5, 40])
def test_a_native_decoder_keeps_the_exact_top_at_every_step(lib, top):
    """A decoder forced onto the kernel: rows at different positions, prefills and steps;
    each row's top ids equal its full fp32 logits' (ties by id), values to fp32 rounding."""
    model = tiny_model(50257, seed=4)
    seqs = torch.randint(0, 50257, (3, BLOCK), generator=torch.Generator().manual_seed(6)).tolist()
    kernel, full = CachedDecoder(model, max_rows=3, screen="native"), CachedDecoder(model, max_rows=3, screen=False)
    pairs = tops_beside_full(kernel, full, seqs, top)
    assert isinstance(kernel._choice(3, top), native.NativeHead)
    assert_exact_tops(pairs, top)


def test_sampled_rows_decode_the_same_with_and_without_the_kernel(lib):
    """The engine's 8 sampled rows (top-k, one batch) and greedy ones: the same tokens with
    the kernel as with PyTorch's head, and as each row decoded alone."""
    model = tiny_model(50257, seed=9)
    cfg = SamplingConfig(temperature=0.8, top_k=200, max_new_tokens=12, stop_at_eot=False)
    greedy = SamplingConfig(temperature=0, max_new_tokens=12, stop_at_eot=False)
    runs = {}
    for screen in ("native", False):
        for name, c in (("sampled", cfg), ("greedy", greedy)):
            engine = Engine(model, max_rows=8, eot_id=50256)
            engine.decoder.screen = screen
            rows = [engine.submit([7, 8 + i], SamplingConfig(**{**c.__dict__, "seed": i})) for i in range(8)]
            engine.run()
            runs[screen, name] = [row.context[2:] for row in rows]
    assert runs["native", "sampled"] == runs[False, "sampled"]
    assert runs["native", "greedy"] == runs[False, "greedy"]
    alone = [generate_ids(model, [7, 8 + i], SamplingConfig(**{**cfg.__dict__, "seed": i})) for i in range(8)]
    assert runs["native", "sampled"] == alone


@pytest.mark.parametrize("k,n", [(32, 16), (48, 80), (128, 384), (512, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_a_linear_layer_matches_float64_and_a_row_gets_the_same_bits_in_any_batch(lib, k, n, rows):
    """rows_linear for every tile (1-4 rows, 1-4 panels, groups of 4 beyond, panels left
    over): x W + b equals float64 products to fp32 rounding, with and without a bias,
    and each row's outputs are bit-identical computed alone."""
    gen = torch.Generator().manual_seed(k + n + rows)
    kernels = native.NativeRows(lib, block=8)
    weight, bias = torch.randn(k, n, generator=gen) / k ** 0.5, torch.randn(n, generator=gen)
    packed = kernels.pack(weight)
    x = torch.randn(rows, k, generator=gen)
    for b in (bias, None):
        y = kernels.linear(x, packed, b)
        exact = x.double() @ weight.double() + (0 if b is None else b.double())
        assert ((y.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()
        for r in range(rows):
            assert torch.equal(kernels.linear(x[r:r + 1].contiguous(), packed, b)[0], y[r])


@pytest.mark.parametrize("hs", native.HEAD_SIZES)
def test_attention_over_each_rows_own_positions_matches_float64_softmax(lib, hs):
    """rows_attend: rows at lengths 1 to block (whole and partial groups of 8 scores), from
    a strided query as the decoder slices it out of its fused QKV: each row equals a float64
    softmax over its own positions, and gets the same bits alone."""
    gen = torch.Generator().manual_seed(hs)
    nh, block, rows = 3, 37, 6
    kernels = native.NativeRows(lib, block)
    kv = torch.randn(rows, 2, nh, block, hs, generator=gen)
    kv[:, 0] *= 4 / hs ** 0.5  # scores of a few units: weights far from uniform
    qkv = torch.randn(rows, 3, nh, 1, hs, generator=gen)
    q = qkv[:, 0].view(rows, nh, hs)  # rows 3 nh hs apart
    lengths = [1, 8, 9, 16, 30, 37]
    y = kernels.attend(q, kv, lengths)
    assert ((y.double() - native._attention_reference(q, kv, lengths)).abs() <= 2e-6).all()
    for r in range(rows):
        assert torch.equal(kernels.attend(q[r:r + 1], kv[r:r + 1], lengths[r:r + 1])[0], y[r])


def test_the_row_kernels_refuse_what_they_cannot_take(lib):
    """A head size it has no kernel for or a length outside 1..block (the C side), a width
    not in whole panels or shapes that do not fit (Python's): an error naming the
    arguments, never a read past a buffer or a wrong answer."""
    kernels = native.NativeRows(lib, block=8)
    with pytest.raises(RuntimeError, match="head size 24"):
        kernels.attend(torch.randn(1, 2, 24), torch.randn(1, 2, 2, 8, 24), [3])
    with pytest.raises(RuntimeError, match="lengths"):
        kernels.attend(torch.randn(1, 2, 16), torch.randn(1, 2, 2, 8, 16), [9])
    with pytest.raises(ValueError, match="multiples of 16"):
        kernels.pack(torch.randn(8, 24))
    packed = kernels.pack(torch.randn(8, 32))
    for x, w, b in ((torch.randn(2, 9), packed, None), (torch.randn(2, 8), packed[:, :4], None),
                    (torch.randn(2, 8), packed, torch.randn(16)), (torch.randn(8, 2).t(), packed, None)):
        with pytest.raises(ValueError, match="rows_linear"):
            kernels.linear(x, w, b)
    with pytest.raises(ValueError, match="rows_attend"):
        kernels.attend(torch.randn(2, 2, 16), torch.randn(1, 2, 2, 8, 16), [3, 3])  # 2 rows, 1 cache


def native_model(seed: int = 8, **kw) -> GPT:
    """A random model for the native blocks, with weights large enough that rows differ."""
    torch.manual_seed(seed)
    cfg = {"vocab_size": 500, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kw", [
    {},
    {"position": "rope", "mlp_activation": "relu2", "norm": "rmsnorm", "qk_norm": True},
    {"position": "rope", "bias": False},
    {"qk_norm": True, "norm": "rmsnorm", "n_head": 8, "n_embd": 64},  # head size 8
    {"position": "rope", "n_head": 1, "n_embd": 128, "n_layer": 1},   # head size 128
], ids=["learned-gelu", "rope-relu2-rmsnorm-qknorm", "rope-nobias", "hs8-qknorm", "hs128"])
def test_a_row_decodes_the_same_bits_alone_and_beside_rows_at_other_positions(lib, kw):
    """The blocks in one native call and the native head: four rows at four positions
    give, at every step, the bits each gets alone; torch's step (addmm, sdpa under a mask)
    agrees to fp32 rounding, and so does the KV cache each leaves."""
    model = native_model(**kw)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 17, 40, 3)]

    def steps(rows, native_rows=None):
        decoder = CachedDecoder(model, max_rows=len(rows), screen="native", native_rows=native_rows)
        for slot, prompt in enumerate(rows):
            decoder.prefill(slot, prompt)
        tokens, out = [p[-1] for p in rows], []
        for i in range(12):
            top = decoder.step(tokens, top=20)
            out.append(top.values.clone())
            tokens = [int(t) for t in top.ids[:, i % 3]]  # not greedy: the rows wander apart
        return torch.stack(out, 1), decoder  # (rows, steps, 20)

    together, decoder = steps(prompts)
    assert isinstance(decoder.kernels, native.NativeRows)
    for r, prompt in enumerate(prompts):
        assert torch.equal(steps([prompt])[0][0], together[r])
    torch_steps, torch_decoder = steps(prompts, native_rows=False)
    assert torch_decoder.kernels is None
    assert ((together - torch_steps).abs() <= 1e-4 * (1 + together.abs())).all()
    for mine, theirs in zip(decoder.kv, torch_decoder.kv):
        assert ((mine - theirs).abs() <= 1e-4 * (1 + theirs.abs())).all()


def test_the_native_blocks_stand_aside_where_they_cannot_run(lib):
    """Head sizes without a kernel, widths not in whole panels, training mode: torch's step,
    and ``native_rows=True`` says which condition failed."""
    for kw, why in (({"n_head": 2, "n_embd": 48}, "head size 24"), ({"n_head": 1, "n_embd": 40}, "head size 40")):
        model = native_model(**kw)
        assert CachedDecoder(model).kernels is None
        with pytest.raises(ValueError, match=why):
            CachedDecoder(model, native_rows=True)
    model = native_model().train()
    assert CachedDecoder(model).kernels is None
    with pytest.raises(ValueError, match="training mode"):
        CachedDecoder(model, native_rows=True)


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_the_first_check_fits_a_model_with_a_context_of_a_few_positions(lib, block):
    """The once-per-model check decodes two rows a few positions ahead of each other: a model
    whose context is shorter than that still gets a decoder (checked within its context)."""
    model = native_model(block_size=block)
    decoder = CachedDecoder(model)
    assert decoder.kernels is not None
    decoder.prefill(0, [1])
    if block > 1:
        assert decoder.step([2], top=3).ids.shape == (1, 3)


def test_native_blocks_that_disagree_with_torch_are_not_used(lib, monkeypatch):
    """Each model's first decoder checks the native blocks against torch's step (two rows
    at different positions): a kernel that computes something else (here made to nudge
    every other channel of the stream, as a miscompiled build might) is never used, and
    decoding still works."""
    step = native.NativeRows.step

    def off(self, x, *args):
        out = step(self, x, *args)
        out[:, ::2] += 0.05  # not a uniform shift: the final LayerNorm would remove that
        return out

    monkeypatch.setattr(native.NativeRows, "step", off)
    model = native_model(seed=3)
    decoder = CachedDecoder(model, max_rows=2)
    assert decoder.kernels is None
    decoder.prefill(0, [1, 2, 3])
    assert decoder.step([4], top=5).ids.shape == (1, 5)
    monkeypatch.setattr(native.NativeRows, "step", step)
    assert CachedDecoder(native_model(seed=4)).kernels is not None  # another model: checked afresh, used


def test_engine_rows_admitted_at_different_times_sample_what_they_sample_alone(lib):
    """A server's rows rarely share a position: requests admitted while others are half way
    through, seeded and sampled, return exactly what each returns decoded alone."""
    model = tiny_model(50257, block_size=64, seed=11)
    cfg = SamplingConfig(temperature=1.0, top_k=100, max_new_tokens=10, stop_at_eot=False)
    engine = Engine(model, max_rows=4, eot_id=50256)
    engine.decoder.screen = "native"
    rows = []
    for i in range(4):
        rows.append(engine.submit([3 + i] * (2 + 3 * i), SamplingConfig(**{**cfg.__dict__, "seed": i})))
        engine.step()  # the next request arrives one step later
    engine.run()
    alone = [generate_ids(model, [3 + i] * (2 + 3 * i), SamplingConfig(**{**cfg.__dict__, "seed": i}))
             for i in range(4)]
    assert [row.context[2 + 3 * i:] for i, row in enumerate(rows)] == alone


def run_status(env: dict) -> str:
    """native.status() in a fresh process (the library is built once per process)."""
    out = subprocess.run([sys.executable, "-c", "from gptcore.model import native; print(native.status())"],
                         cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_without_a_compiler_or_switched_off_decoding_falls_back(tmp_path):
    """No compiler, a compiler that fails, or GPTCORE_NATIVE=0: no library, a status that
    says why, and generation still works (PyTorch's head)."""
    cache = str(tmp_path / "cache")
    assert run_status({"GPTCORE_NATIVE": "0", "GPTCORE_CACHE_DIR": cache}).startswith("off (GPTCORE_NATIVE=0)")
    assert run_status({"CC": str(tmp_path / "no-such-cc"), "GPTCORE_CACHE_DIR": cache}).startswith("no C compiler")
    assert run_status({"CC": "false", "GPTCORE_CACHE_DIR": cache}).startswith(("no C compiler", "build failed"))
    code = ("import torch; from gptcore.config import GPTConfig; from gptcore.model import GPT; "
            "from gptcore.generation.generate import SamplingConfig, generate_ids; "
            "from gptcore.model import native; torch.manual_seed(0); m = GPT(GPTConfig(vocab_size=300, "
            "block_size=16, n_layer=1, n_head=2, n_embd=16)).eval(); "
            "print(len(generate_ids(m, [1], SamplingConfig(temperature=0.8, top_k=5, max_new_tokens=5, "
            "stop_at_eot=False))), native.library() is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GPTCORE_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "True"]


def test_the_library_is_cached_per_source_compiler_and_cpu(tmp_path):
    """A second process loads the library the first built (same path, not rebuilt); nothing
    half-written is left in the cache."""
    cache = tmp_path / "cache"
    first = run_status({"GPTCORE_CACHE_DIR": str(cache)})
    assert first.startswith("built ("), first
    libs = list((cache / "native").iterdir())
    assert len(libs) == 1 and libs[0].suffix == ".so"
    mtime = libs[0].stat().st_mtime_ns
    assert run_status({"GPTCORE_CACHE_DIR": str(cache)}) == first
    assert [p.stat().st_mtime_ns for p in (cache / "native").iterdir()] == [mtime]
