"""Generation: the KV cache against full forward passes, every sampling filter, stop
conditions, UTF-8-safe streaming, and batches of samples against single decodes. Tiny
models only; everything runs on a CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import char_tokenizer
from test_variants import VARIANTS

from gptcore.config import ConfigError, GPTConfig
from gptcore.data.tokenizer import CharTokenizer, GPT2Tokenizer
from gptcore.generation.engine import Engine
from gptcore.generation.generate import SamplingConfig, generate, generate_batch, generate_ids, stream, stream_batch
from gptcore.generation.logits import apply_repetition_penalty, candidates, draw
from gptcore.generation.sampling import SampleConfig
from gptcore.generation.text import TextPieces
from gptcore.model import GPT, KVCache
from gptcore.model.decode import CachedDecoder, _block_top, exact_top

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak!\n"
BLOCK = 16
GREEDY = SamplingConfig(temperature=0.0, stop_at_eot=False)


def tiny_model(vocab_size: int, block_size: int = BLOCK, seed: int = 0, **kw) -> GPT:
    """A random tiny GPT with weights large enough to give logits clear of each other
    (the default 0.02 init makes every logit almost equal)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=32, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def batch_ids(model, prompt, n, cfg, **kw) -> list[list[int]]:
    """The ids of ``n`` completions of ``prompt`` decoded side by side by one engine,
    completion i with seed ``cfg.seed + i`` (what ``--num-samples`` runs)."""
    engine = Engine(model, max_rows=n, **kw)
    for i in range(n):
        engine.submit(prompt, cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + i), tag=i)
    out = [[] for _ in range(n)]
    for row, token in engine.run():
        if token is not None:
            out[row.tag].append(token)
    return out


def text_pieces(tokenizer, ids, stops) -> list[str]:
    """What the text layer releases for ``ids``, piece by piece, up to a stop string."""
    text, out = TextPieces(tokenizer, stops), []
    for token in ids:
        out.append(text.push(token))
        if text.stopped:
            return [p for p in out if p]
    out.append(text.finish())
    return [p for p in out if p]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return char_tokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """A tiny GPT trained for a moment to memorise TEXT, so greedy decoding produces varied,
    context-dependent text with clear margins between the top logits (random weights
    decode into one repeated token)."""
    model = tiny_model(tok.vocab_size)
    model.apply(model._init_weights)
    data = torch.tensor(tok.encode(TEXT * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        ix = torch.randint(0, len(data) - BLOCK - 1, (16,), generator=gen).tolist()
        x = torch.stack([data[i:i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1:i + BLOCK + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("arch", [{"attn_impl": "sdpa"}, {"attn_impl": "math"}, {"bias": False}],
                         ids=["sdpa", "math", "no-bias"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast-step", "module-step"])
def test_cached_logits_equal_full_forward_at_every_step(tok, arch, fast):
    model = tiny_model(tok.vocab_size, **arch)
    if not fast:
        model.train()  # dropout is 0: same numbers, but steps go through GPT.hidden_states
    seq = torch.randint(0, tok.vocab_size, (BLOCK,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = CachedDecoder(model)
    assert runner.fast is fast
    n_prompt = 5
    got = [runner.prefill(0, seq[:n_prompt])]
    for t in seq[n_prompt:]:
        got.append(runner.step([t])[0])
    with torch.no_grad():
        full, _ = model(torch.tensor([seq]))
    for i, logits in enumerate(got):  # logits after position n_prompt - 1 + i
        torch.testing.assert_close(logits, full[0, n_prompt - 1 + i], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="full|block_size"):
        runner.step([seq[0]])  # the cache holds block_size positions: no room for another


def test_model_kv_cache_prefill_then_steps_equal_full_forward(model, tok):
    """GPT.forward with a KVCache (the model's own path), prefill + single-token steps."""
    seq = torch.randint(0, tok.vocab_size, (1, BLOCK), generator=torch.Generator().manual_seed(2))
    shape = (1, model.config.n_head, BLOCK, model.config.n_embd // model.config.n_head)
    cache = KVCache(k=[torch.zeros(shape) for _ in range(2)], v=[torch.zeros(shape) for _ in range(2)])
    with torch.no_grad():
        full, _ = model(seq)
        pre, _ = model(seq[:, :6], cache=cache)
        torch.testing.assert_close(pre, full[:, :6], atol=1e-4, rtol=0)
        for t in range(6, BLOCK):
            step, _ = model(seq[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="block_size"):
            model(seq[:, :1], cache=cache)


@pytest.mark.parametrize("crop_to", [None, BLOCK, BLOCK - 1, 3, 1])
@pytest.mark.parametrize("prompt_len", [0, 3, 40])
def test_greedy_with_cache_equals_without_past_block_size(model, tok, crop_to, prompt_len):
    prompt = torch.randint(0, tok.vocab_size - 1, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = dataclasses.replace(GREEDY, max_new_tokens=3 * BLOCK + 5)
    cached = generate_ids(model, prompt, cfg, eot_id=tok.eot_id, crop_to=crop_to)
    uncached = generate_ids(model, prompt, cfg, eot_id=tok.eot_id, crop_to=crop_to, use_cache=False)
    assert cached == uncached
    assert len(cached) == cfg.max_new_tokens
    assert len(set(cached)) > 3  # a real sequence, not one token repeated


def test_cache_rebuild_uses_positions_from_zero(model, tok):
    """After a crop the window is re-encoded from position 0: the next token equals a
    fresh greedy run on exactly that window."""
    prompt = list(range(BLOCK))  # a full window
    cfg = dataclasses.replace(GREEDY, max_new_tokens=2)
    first, second = generate_ids(model, prompt, cfg, crop_to=4)
    window = (prompt + [first])[-4:]
    assert generate_ids(model, window, dataclasses.replace(cfg, max_new_tokens=1)) == [second]


def test_sampled_with_cache_equals_without(model, tok):
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=10, top_p=0.9, seed=5, stop_at_eot=False)
    assert generate_ids(model, [1, 2], cfg) == generate_ids(model, [1, 2], cfg, use_cache=False)


# --------------------------------------------------------------------------- prompts


def test_empty_prompt_starts_from_eot(model, tok):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=10)
    assert generate_ids(model, [], cfg, eot_id=tok.eot_id) == generate_ids(model, [tok.eot_id], cfg)
    assert generate(model, tok, "", cfg) == tok.decode(generate_ids(model, [tok.eot_id], cfg))
    with pytest.raises(ValueError, match="eot_id"):
        generate_ids(model, [], cfg)


def test_prompt_longer_than_context_keeps_its_last_block_size_tokens(model, tok):
    prompt = (list(range(tok.vocab_size - 1)) * 2)[:3 * BLOCK]
    cfg = dataclasses.replace(GREEDY, max_new_tokens=5)
    assert generate_ids(model, prompt, cfg) == generate_ids(model, prompt[-BLOCK:], cfg)


def test_bad_ids_and_arguments(model, tok):
    with pytest.raises(ValueError, match="outside"):
        generate_ids(model, [tok.vocab_size + 5], GREEDY)
    with pytest.raises(ValueError, match="crop_to"):
        generate_ids(model, [1], GREEDY, crop_to=BLOCK + 1)
    with pytest.raises(ValueError, match="device"):
        generate_ids(model, [1], GREEDY, device="meta")
    assert generate_ids(model, [1], dataclasses.replace(GREEDY, max_new_tokens=0)) == []


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_sample_different_seed_different(model, tok):
    cfg = SamplingConfig(max_new_tokens=60, temperature=1.0, seed=123, stop_at_eot=False)
    a = generate(model, tok, "First", cfg)
    assert a == generate(model, tok, "First", cfg)
    b = generate(model, tok, "First", dataclasses.replace(cfg, seed=124))
    assert a != b
    assert len(a) == len(b) == 60


def test_temperature_zero_is_greedy(model, tok):
    prompt = tok.encode("Speak")
    ids = generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=8))
    # the same thing by hand: argmax of a full forward pass, token by token
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    assert ids == seq[len(prompt):]
    logits = torch.randn(5, 30)
    cfg = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)
    assert draw(logits, cfg, [None] * 5) == logits.argmax(-1).tolist()


def test_low_temperature_approaches_greedy(model, tok):
    prompt = tok.encode("All")
    greedy = generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=10))
    cold = generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=1e-4, seed=0,
                                                      stop_at_eot=False))
    assert cold == greedy


def test_a_temperature_below_the_floor_is_greedy_not_garbage(model, tok):
    # 1e-40 overflowed float32: every score infinite, end-of-text drawn, empty text reported
    # as a normal stop. Below MIN_TEMPERATURE a temperature is greedy.
    from gptcore.generation.sampling import MIN_TEMPERATURE

    assert SamplingConfig(temperature=1e-40).temperature == 0.0 and SamplingConfig(temperature=1e-40).greedy
    assert SamplingConfig(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE
    prompt = tok.encode("All")
    greedy = generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=10))
    for t in (1e-40, 1e-300, 5e-324):
        assert generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=t, seed=0,
                                                          stop_at_eot=False)) == greedy


def test_scoring_is_the_models_log_softmax_window_by_window(model, tok):
    from gptcore.generation.scoring import score_tokens

    block = model.config.block_size
    ids = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak. " * 4)[:2 * block + 7]
    scored = score_tokens(model, ids, top_n=2)
    assert scored[0] is None and all(s is not None for s in scored[1:])
    with torch.no_grad():  # the first window: one forward pass, the next block tokens predicted
        logits, _ = model(torch.tensor([ids[:block]]))
        lp = torch.log_softmax(logits[0].float(), -1)
    for i in range(1, block + 1):
        value, alts = scored[i]
        assert abs(value - float(lp[i - 1, ids[i]])) < 1e-5
        assert [a for a, _ in alts] == lp[i - 1].topk(2).indices.tolist()
    with torch.no_grad():  # a later token: scored with its window's context (half a block back at least)
        start = block // 2
        logits, _ = model(torch.tensor([ids[start:start + block]]))
        lp = torch.log_softmax(logits[0].float(), -1)
    i = block + 1
    assert abs(scored[i][0] - float(lp[i - start - 1, ids[i]])) < 1e-5
    assert score_tokens(model, ids[:1]) == [None] and score_tokens(model, []) == []


def kept(logits: torch.Tensor, **settings) -> list[list[int]]:
    """Per row, the ids the filters leave (sorted)."""
    scores, ids = candidates(logits, SamplingConfig(**{"temperature": 1.0, **settings}))
    return [sorted(i[torch.isfinite(s)].tolist()) for s, i in zip(scores, ids)]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 49):
        for row, ids in zip(logits, kept(logits, top_k=k)):
            assert ids == sorted(row.topk(k).indices.tolist())
    assert kept(logits, top_k=0) == kept(logits, top_k=50) == [list(range(50))] * 4
    scores, ids = candidates(logits, SamplingConfig(temperature=2.0, top_k=5))
    torch.testing.assert_close(scores, logits.gather(1, ids) / 2.0)  # tempered, otherwise unchanged


def test_top_k_at_a_tie_keeps_exactly_k_of_the_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0]])
    for k in (2, 3, 5):
        [ids] = kept(logits, top_k=k)
        dropped = [i for i in range(7) if i not in ids]
        assert len(ids) == k and min(logits[0, ids]) >= max(logits[0, dropped])
    assert len(kept(torch.zeros(1, 10), top_k=4)[0]) == 4  # all tied


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # order by probability: 1, 3, 2, 0
    logits = probs.log()[None]
    assert kept(logits, top_p=0.3) == [[1]]            # 0.5 alone reaches 0.3
    assert kept(logits, top_p=0.75) == [[1, 3]]        # 0.5 + 0.3
    assert kept(logits, top_p=0.85) == [[1, 2, 3]]     # 0.5 + 0.3 + 0.15
    assert kept(logits, top_p=0.97) == [[0, 1, 2, 3]]
    assert kept(logits, top_p=1.0) == [[0, 1, 2, 3]]
    assert kept(torch.zeros(1, 6), top_p=0.4) == [[0, 1, 2]]  # six equal tokens: the lowest ids first
    assert kept(torch.cat([logits, logits.flip(1)]), top_p=0.75) == [[1, 3], [0, 2]]
    # top-p among the top-k: the probabilities are the top-k's own (renormalised)
    assert kept(logits, top_k=3, top_p=0.6) == [[1, 3]]  # 0.5/0.95 < 0.6 <= 0.8/0.95


def test_draws_follow_the_filtered_distribution():
    """The inverse-CDF draw picks each candidate as often as its filtered probability
    (4,000 draws, each frequency within 0.03) and never an id a filter dropped."""
    probs = torch.tensor([0.02, 0.5, 0.15, 0.3, 0.03])
    logits = probs.log()[None]
    cfg = SamplingConfig(temperature=1.0, top_k=4)  # drops id 0
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[draw(logits, cfg, [gen])[0]] += 1
    expected = torch.tensor([0.0, 0.5, 0.15, 0.3, 0.03]) / 0.98
    assert counts[0] == 0 and torch.allclose(counts / 4000, expected, atol=0.03)
    # rows of a batch: each its own generator, each from its own distribution
    two = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert draw(two, SamplingConfig(temperature=1.0, top_k=1), gens) == [1, 0]


def test_the_same_generator_state_draws_the_same_token():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9)
    first = draw(logits, cfg, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert first == draw(logits, cfg, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    # a row drawn alone draws what it draws in a batch (the batch does not matter)
    assert [draw(logits[i:i + 1], cfg, [torch.Generator().manual_seed(s)])[0]
            for i, s in enumerate((1, 2, 3))] == first


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    seen = [0, 1, 1]
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -2.0]  # positive / 2, negative * 2, others as is
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, [], 2.0), logits)
    # through draw: greedy with the penalty picks what wins after it, per row's own history
    rows = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert draw(rows, greedy, [None, None], seen=[[0], []]) == [1, 0]


def test_repetition_penalty_changes_greedy_output(model, tok):
    prompt = tok.encode("speak, speak")
    plain = generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=30))
    penalized = generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=30, repetition_penalty=5.0))
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))
    assert penalized == generate_ids(model, prompt, dataclasses.replace(GREEDY, max_new_tokens=30,
                                                                        repetition_penalty=5.0), use_cache=False)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -2.0), ("max_new_tokens", -1),
    ("max_new_tokens", True), ("seed", -3), ("seed", 1.5), ("stop", [""]), ("stop", [1]),
    ("stop_at_eot", "yes"),
])
def test_validation_errors_name_the_field_and_value(field, value):
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and repr(value) in msg and "allowed" in msg


def test_valid_configs_and_the_params_yaml_section():
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=0,
                         stop=["\n", "END"], seed=0)
    assert cfg.stop == ("\n", "END") and isinstance(cfg.temperature, float)
    assert SamplingConfig(stop="\n").stop == ("\n",)
    SampleConfig()  # params.yaml's sample section validates through SamplingConfig
    with pytest.raises(ConfigError, match="top_p"):
        SampleConfig(top_p=0.0)


# --------------------------------------------------------------------------- stop conditions


def test_stop_strings_end_generation_before_the_stop_text(model, tok):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=60)
    full = generate(model, tok, "First", cfg)
    stop = full[20:23]
    cut = full.index(stop)
    assert generate(model, tok, "First", dataclasses.replace(cfg, stop=[stop])) == full[:cut]
    # the earliest of several stop strings wins; one that never appears changes nothing
    other = full[30:32]
    assert generate(model, tok, "First", dataclasses.replace(cfg, stop=[other, stop, "@@"])) == \
        full[:min(cut, full.index(other))]
    assert generate(model, tok, "First", dataclasses.replace(cfg, stop=["@@"])) == full
    # the pieces streamed before the stop never contain part of it
    pieces = list(stream(model, tok, "First", dataclasses.replace(cfg, stop=[stop])))
    assert "".join(pieces) == full[:cut]


def test_text_layer_holds_back_partial_stop_strings(tok):
    ids = tok.encode("a cat hear me speak")
    assert "".join(text_pieces(tok, ids, ["me s", "xyz"])) == "a cat hear "
    assert text_pieces(tok, tok.encode("Speak"), ["Speak"]) == []
    assert "".join(text_pieces(tok, tok.encode("speak, spe"), ["speed"])) == "speak, spe"


def test_end_of_text_stops_generation(model, tok):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=40)
    ids = generate_ids(model, [1, 2, 3], cfg)
    target = ids[10]
    first = ids.index(target)
    # pretend that token is end-of-text: generation ends right before it
    stopped = generate_ids(model, [1, 2, 3], dataclasses.replace(cfg, stop_at_eot=True), eot_id=target)
    assert stopped == ids[:first]
    assert generate_ids(model, [1, 2, 3], cfg, eot_id=target) == ids  # stop_at_eot=False
    # with a real tokenizer: a model that always prefers the end-of-text token
    eager = tiny_model(tok.vocab_size)
    with torch.no_grad():
        eager.transformer.ln_f.weight.zero_()
        eager.transformer.ln_f.bias.zero_()
        eager.transformer.ln_f.bias[0] = 1.0
        eager.transformer.wte.weight[:, 0] = -1.0
        eager.transformer.wte.weight[tok.eot_id, 0] = 20.0
    assert generate(eager, tok, "First", SamplingConfig(max_new_tokens=20, seed=0)) == ""
    assert generate(eager, tok, "First", SamplingConfig(max_new_tokens=3, temperature=0, stop_at_eot=False)) == \
        "<|endoftext|>" * 3


def test_generate_returns_the_decoded_completion(model, tok):
    cfg = dataclasses.replace(GREEDY, max_new_tokens=25)
    ids = generate_ids(model, tok.encode("hear"), cfg, eot_id=tok.eot_id)
    assert generate(model, tok, "hear", cfg) == tok.decode(ids)
    assert "".join(stream(model, tok, tok.encode("hear"), cfg)) == tok.decode(ids)


# --------------------------------------------------------------------------- GPT-2 BPE


def test_streaming_never_splits_a_utf8_character(mirror_dir):
    gpt2 = GPT2Tokenizer(mirror_dir)
    text = "naïve café — 日本語のテキスト 🙂🎉 ok"
    ids = gpt2.encode(text)
    assert any("\ufffd" in gpt2.decode([i]) for i in ids)  # some tokens are partial characters
    pieces = text_pieces(gpt2, ids, ())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a dangling partial character at the very end becomes one replacement character
    assert "".join(text_pieces(gpt2, gpt2.encode("ok 🙂")[:-1], ())).startswith("ok")


def test_generation_with_the_gpt2_tokenizer(mirror_dir):
    gpt2 = GPT2Tokenizer(mirror_dir)
    model = tiny_model(gpt2.vocab_size, block_size=32)
    cfg = SamplingConfig(max_new_tokens=12, seed=0, top_k=50)
    out = generate(model, gpt2, "Hello", cfg)
    assert isinstance(out, str) and out and out == generate(model, gpt2, "Hello", cfg)


# --------------------------------------------------------------------------- screened LM head


def expected_top(logits: torch.Tensor, top: int) -> list[int]:
    """The ``top`` ids of one row of logits by value descending, then id ascending (brute force)."""
    values = logits.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:top]


@pytest.mark.parametrize("vocab", [66, 700, 4096, 50257])
@pytest.mark.parametrize("top", [1, 5, 200])
@pytest.mark.parametrize("rows", [1, 8])
def test_exact_top_is_the_brute_force_order_ties_included(vocab, top, rows):
    """exact_top (block maxima, then the kept blocks' entries) returns each row's ``top``
    largest logits in the order of a full sort, equal logits by id, with ties across the
    margin, -0.0 equal to 0.0, and a vocabulary smaller than ``top``."""
    gen = torch.Generator().manual_seed(vocab + top + rows)
    logits = torch.randn(rows, vocab, generator=gen)
    tied = (logits * 2).round() / 2  # a few distinct values: ties everywhere, across every margin
    tied[0, :10] = -0.0
    for case in (logits, tied):
        got = exact_top(case, top)
        assert got.ids.shape == (rows, min(top, vocab))
        for r in range(rows):
            want = expected_top(case[r] + 0.0, top)
            assert got.ids[r].tolist() == want
            assert torch.equal(got.values[r], case[r, want])


@pytest.mark.parametrize("rows", [2, 8])
def test_block_top_looks_into_the_tails_and_holds_the_whole_band(rows):
    """The pyramid's check passes on distinct logits (no fallback), finds a top logit placed
    in the entries no block holds at either level, and with a band keeps every id within
    it of the top-th logit, or says it could not."""
    vocab, top = 50257, 20  # 50257 = 8 * 6282 + 1; 6282 = 8 * 785 + 2: a tail at each level
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen)
    logits[:, vocab - 1] = 9.0  # the last id: no level-0 block holds it
    logits[:, 6281 + 6282 * 3] = 8.0  # a level-0 block in the level-1 tail
    values, ids, complete = _block_top(logits, top)
    assert complete.all()
    for r in range(rows):
        assert set(expected_top(logits[r], top)) <= set(ids[r].tolist())
    band = torch.full((rows, 1), 0.05)
    values, ids, complete = _block_top(logits, top, band)
    for r in range(rows):
        kth = logits[r].topk(top).values[-1]
        within = set((logits[r] >= kth - 0.05).nonzero().squeeze(1).tolist())
        assert within <= set(ids[r].tolist()) or not complete[r]
    assert _block_top(logits, top, torch.full((rows, 1), 10.0))[2].logical_not().all()  # too wide to vouch for


def test_sampled_top_k_rows_in_one_batch_equal_their_lone_decodes(model, tok):
    """Top-k rows without a penalty draw from the step's batched top (the engine's
    shortcut): each equals the single decode with its seed."""
    cfg = SamplingConfig(temperature=0.9, top_k=7, seed=21, max_new_tokens=40, stop_at_eot=False)
    rows = batch_ids(model, tok.encode("First"), 4, cfg)
    assert rows == [generate_ids(model, tok.encode("First"), dataclasses.replace(cfg, seed=cfg.seed + i))
                    for i in range(4)]
    assert len({tuple(r) for r in rows}) == 4


def tops_beside_full(decoder: CachedDecoder, full: CachedDecoder, seqs: list[list[int]], top: int) -> list:
    """Three rows prefilled to different positions, then 6 steps side by side: pairs of
    ``decoder``'s top ``top`` and ``full``'s logits (rows, vocab) for the same inputs."""
    pairs = []
    for slot, n in enumerate((3, 4, 6)):
        pairs.append((decoder.prefill(slot, seqs[slot][:n], top), full.prefill(slot, seqs[slot][:n])[None]))
    for t in range(6, 12):
        tokens = [seqs[r][t] for r in range(3)]
        pairs.append((decoder.step(tokens, top), full.step(tokens)))
    return pairs


def assert_exact_tops(pairs: list, top: int) -> None:
    """Each row's top ids are its full logits' (ties by id), their values the exact ones."""
    for got, ref in pairs:
        for g_ids, g_values, r in zip(got.ids.view(-1, top), got.values.view(-1, top), ref):
            assert g_ids.tolist() == expected_top(r, top)
            torch.testing.assert_close(g_values, r[g_ids], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("top", [1, 5, 40])
def test_screened_head_keeps_the_exact_top_k(kind, top):
    """With a GPT-2-sized vocabulary a step screens the head (fp16 weights through FBGEMM,
    or bf16) and recomputes the candidates in fp32: the top ``top`` ids equal the full
    fp32 logits' (ties by id) and their values the exact ones, one row and several at
    different positions, and the screen did the work."""
    model = tiny_model(50257, seed=4)
    seqs = torch.randint(0, 50257, (3, BLOCK), generator=torch.Generator().manual_seed(6)).tolist()
    screened, full = CachedDecoder(model, max_rows=3, screen=kind), CachedDecoder(model, max_rows=3)
    if kind not in screened._screen_kinds():
        pytest.skip(f"this torch has no {kind} head")  # fp16 needs FBGEMM (x86 CPU wheels have it)
    pairs = tops_beside_full(screened, full, seqs, top)
    # A step whose candidates the band can't vouch for falls back to the exact head (also
    # checked below); most must not.
    assert screened._screens == 9 and screened._misses <= 2
    assert_exact_tops(pairs, top)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_a_screens_radius_bounds_its_error(kind):
    """The screen's radius is an upper bound of |approximate - exact| for every logit,
    on rows as large as a final norm gives and larger, and not loose by orders of
    magnitude (so the band keeps few candidates)."""
    model = tiny_model(50257, seed=4)
    decoder = CachedDecoder(model, screen=kind)
    if kind not in decoder._screen_kinds():
        pytest.skip(f"this torch has no {kind} head")
    approx, radius = decoder._make_screen(kind)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for scale in (1.0, 30.0):
            x = torch.randn(8, 32, generator=gen) * scale
            exact = x.double() @ model.lm_head.weight.double().t()
            y = approx(x)
            err = (y.double() - exact).abs().amax(-1, keepdim=True)
            r = radius(x, y).double()
            assert (err <= r).all()
            assert (r < 100 * err).all()


def test_sampling_reads_only_ids_the_tokenizer_has():
    """A model vocabulary padded past the tokenizer's never yields a padded id, screened or not."""
    model = tiny_model(50257, seed=5)
    with torch.no_grad():  # make the padded ids the most likely ones
        model.lm_head.weight[1000:] *= 5
    for cfg in (GREEDY, SamplingConfig(temperature=1.0, top_k=3, seed=0, stop_at_eot=False),
                SamplingConfig(temperature=1.0, seed=0, stop_at_eot=False)):
        ids = generate_ids(model, [1, 2], dataclasses.replace(cfg, max_new_tokens=20), vocab_size=1000)
        assert len(ids) == 20 and max(ids) < 1000


# --------------------------------------------------------------------------- batches


SAMPLED = SamplingConfig(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=11, stop_at_eot=False)


@pytest.mark.parametrize("variant", ["gpt2", *VARIANTS])
@pytest.mark.parametrize("fast", [True, False], ids=["fast-step", "module-step"])
def test_decoder_rows_at_different_positions_equal_full_forwards(tok, fast, variant):
    """Rows prefilled with windows of different lengths step side by side, each at its
    own position (a masked step), a row is moved to another slot, one is re-prefilled,
    rows at one position step unmasked: at every step each row's logits are the full
    forward pass over its own window. The fast step restates the block equations, so
    this runs for every architecture variant (test_variants.py) too."""
    model = tiny_model(tok.vocab_size, **VARIANTS.get(variant, {}))
    if not fast:
        model.train()  # dropout is 0: same numbers, but steps go through GPT.hidden_states
    gen = torch.Generator().manual_seed(7)
    seqs = torch.randint(0, tok.vocab_size, (3, BLOCK), generator=gen).tolist()
    decoder = CachedDecoder(model, max_rows=3)
    # The fast multi-row steps below run the LM head through oneDNN's packed linear
    # (torch's CPU wheel has it); one-row prefills through torch.mm.
    assert decoder.packable
    windows = [seqs[0][:2], seqs[1][:5], seqs[2][:9]]

    def expect(window):
        with torch.no_grad():
            return model(torch.tensor([window]))[0][0, -1]

    for slot, window in enumerate(windows):
        torch.testing.assert_close(decoder.prefill(slot, window), expect(window), atol=1e-4, rtol=0)
    for _ in range(5):
        tokens = [seqs[r][len(windows[r])] for r in range(3)]
        got = decoder.step(tokens)
        for r in range(3):
            windows[r] = windows[r] + [tokens[r]]
            torch.testing.assert_close(got[r], expect(windows[r]), atol=1e-4, rtol=0)
    assert decoder.lengths[:3] == [7, 10, 14]
    decoder.move(2, 0)  # row 0 finished: the last row takes its slot
    windows = [windows[2], windows[1]]
    windows[1] = windows[1][-3:]  # row 1 cropped: its window is re-prefilled from position 0
    decoder.prefill(1, windows[1])
    for step in range(2):
        tokens = [seqs[0][step], seqs[1][step]]
        got = decoder.step(tokens)
        for r in range(2):
            windows[r] = windows[r] + [tokens[r]]
            torch.testing.assert_close(got[r], expect(windows[r]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="full|block_size"):
        decoder.step([1, 1])  # row 0 holds block_size positions: no room for another
    twin = CachedDecoder(model, max_rows=2)  # rows at one position: the unmasked step
    for slot in range(2):
        twin.prefill(slot, seqs[slot][:6])
    got = twin.step([seqs[0][6], seqs[1][6]])
    for r in range(2):
        torch.testing.assert_close(got[r], expect(seqs[r][:7]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("crop_to", [None, 3])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_greedy_batch_rows_equal_the_single_greedy_decode(model, tok, crop_to, use_cache):
    """Past block_size (each row crops and re-prefills on its own), with and without
    the repetition penalty (per-row history)."""
    for penalty in (1.0, 2.0):
        cfg = dataclasses.replace(GREEDY, max_new_tokens=3 * BLOCK + 5, repetition_penalty=penalty)
        single = generate_ids(model, [1, 2], cfg, crop_to=crop_to)
        rows = batch_ids(model, [1, 2], 4, cfg, crop_to=crop_to, use_cache=use_cache)
        assert rows == [single] * 4
        assert len(single) == cfg.max_new_tokens and len(set(single)) > 3


@pytest.mark.parametrize("crop_to", [None, 3])
def test_sampled_batch_row_i_equals_an_independent_uncached_decode_with_seed_plus_i(model, tok, crop_to):
    """Row i draws from its own generator seeded seed + i and filters its own logits
    (penalty on its own tokens, top-k, top-p): it equals the single-sequence decode with
    that seed through full forward passes, past block_size."""
    cfg = dataclasses.replace(SAMPLED, max_new_tokens=3 * BLOCK)
    rows = batch_ids(model, tok.encode("First"), 5, cfg, crop_to=crop_to)
    reference = [generate_ids(model, tok.encode("First"), dataclasses.replace(cfg, seed=cfg.seed + i),
                              crop_to=crop_to, use_cache=False) for i in range(5)]
    assert rows == reference
    assert len({tuple(r) for r in rows}) == 5  # the rows are different samples
    assert batch_ids(model, tok.encode("First"), 5, cfg, crop_to=crop_to) == rows  # reproducible
    other = batch_ids(model, tok.encode("First"), 5, dataclasses.replace(cfg, seed=99), crop_to=crop_to)
    assert other != rows


def test_batch_of_one_is_the_single_decode_exactly(model, tok, mirror_dir):
    """num_samples=1 gives what generate() gives (the sample stage's samples.md relies on
    it): greedy, sampled, with stop strings, from an empty prompt, with a screened head."""
    for cfg in (dataclasses.replace(GREEDY, max_new_tokens=50), dataclasses.replace(SAMPLED, max_new_tokens=50),
                SamplingConfig(max_new_tokens=50, seed=3, stop=["e"]), SamplingConfig(max_new_tokens=30, seed=4)):
        for prompt in ("First", ""):
            assert generate_batch(model, tok, prompt, 1, cfg) == [generate(model, tok, prompt, cfg)]
    gpt2 = GPT2Tokenizer(mirror_dir)
    big = tiny_model(gpt2.vocab_size, block_size=32)
    for cfg in (SamplingConfig(max_new_tokens=40, seed=0, top_k=50), SamplingConfig(max_new_tokens=40, temperature=0)):
        assert generate_batch(big, gpt2, "Hello", 1, cfg) == [generate(big, gpt2, "Hello", cfg)]


def test_batch_rows_stop_independently(model, tok):
    """A stop string, or end-of-text, ends one row at its own step; the others go on,
    and the finished row leaves the batch."""
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.5, seed=11, stop_at_eot=False)  # varied rows
    full = generate_batch(model, tok, "First", 4, cfg)
    assert len(set(full)) == 4 and all(len(t) == 40 for t in full)
    stop = next(c for c in "etaoinsrh ,\n" if sum(c in t[5:] for t in full) >= 2
                and len({t.find(c) for t in full}) > 1)
    stopped = generate_batch(model, tok, "First", 4, dataclasses.replace(cfg, stop=[stop]))
    assert stopped == [t[:t.index(stop)] if stop in t else t for t in full]
    # completions come out as they finish: shortest (earliest) first
    order = [i for i, _ in stream_batch(model, tok, "First", 4, dataclasses.replace(cfg, stop=[stop]))]
    assert sorted(order) == [0, 1, 2, 3]
    assert [len(stopped[i]) for i in order] == sorted(len(t) for t in stopped)

    ids = batch_ids(model, [1, 2, 3], 4, cfg)
    eot = ids[0][12]  # pretend this token is end-of-text
    engine = Engine(model, max_rows=4, eot_id=eot)
    for i in range(4):
        engine.submit([1, 2, 3], dataclasses.replace(cfg, stop_at_eot=True, seed=cfg.seed + i))
    sizes = []
    while engine.busy:
        sizes.append(len(engine.step()))
    ended = batch_ids(model, [1, 2, 3], 4, dataclasses.replace(cfg, stop_at_eot=True), eot_id=eot)
    assert ended == [r[:r.index(eot)] if eot in r else r for r in ids]
    assert sizes[0] == 4 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 4


def test_batch_arguments(model, tok):
    with pytest.raises(ValueError, match="num_samples=0 is invalid; allowed: an integer >= 1"):
        generate_batch(model, tok, "First", 0, GREEDY)
    with pytest.raises(ValueError, match="num_samples"):
        generate_batch(model, tok, "First", 2.5, GREEDY)
    with pytest.raises(ValueError, match="max_rows=0 is invalid"):
        Engine(model, max_rows=0)
    assert generate_batch(model, tok, "First", 3, dataclasses.replace(GREEDY, max_new_tokens=0)) == ["", "", ""]



def test_many_samples_decode_in_bounded_batches_with_seed_plus_i(model, tok, monkeypatch):
    """Past MAX_BATCH_ROWS the samples decode in consecutive batches (memory bounded
    whatever N is); sample i is still the one seed + i gives."""
    import gptcore.generation.generate as generate_module
    from gptcore.generation.generate import generate_batch

    monkeypatch.setattr(generate_module, "MAX_BATCH_ROWS", 2)
    cfg = dataclasses.replace(SAMPLED, max_new_tokens=12)
    texts = generate_batch(model, tok, "First", 5, cfg)
    reference = [generate_module.generate(model, tok, "First", dataclasses.replace(cfg, seed=cfg.seed + i))
                 for i in range(5)]
    assert texts == reference and len(set(texts)) > 1
