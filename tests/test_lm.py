"""The LM backend on the real embedded default (SmolLM2-135M-Instruct GGUF)."""

import collections

import pytest
import torch

from envs.lm import ModelConfig, load_causal_lm
from samplers import sample

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves falling slowly.", "Hi",
           "Explain in two sentences why the sky is blue to a child who keeps asking questions."]


def _greedy_alone(lm, ids, steps):
    logits, state = lm.prefill([ids])
    out = []
    for _ in range(steps):
        out.append(logits[0])
        logits = lm.decode(state, logits.argmax(-1))
    return torch.stack(out)  # (steps, V)


@pytest.mark.slow
def test_loading_twice_returns_the_cached_model(lm):
    assert load_causal_lm() is lm
    assert lm.vocab_size == 49152 and lm.max_context >= 2048
    assert lm.tokenizer.decode(lm.eos_token_ids.tolist()) == "<|im_end|>"


@pytest.mark.slow
def test_left_padding_matches_each_prompt_alone_over_16_steps(lm):
    ids = lm.encode(PROMPTS)
    assert len({len(i) for i in ids}) > 1  # really padded
    logits, state = lm.prefill(ids)
    batched = []
    for _ in range(16):
        batched.append(logits)
        logits = lm.decode(state, logits.argmax(-1))
    batched = torch.stack(batched, 1)  # (B, 16, V)
    for row, prompt_ids in enumerate(ids):
        alone = _greedy_alone(lm, prompt_ids, 16)
        torch.testing.assert_close(batched[row], alone, atol=2e-3, rtol=1e-3)
        assert torch.equal(batched[row].argmax(-1), alone.argmax(-1))


def _hf_greedy(lm, ids, steps):
    """Reference without Kelvin's cache code: transformers' own forward and DynamicCache, greedy tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    kwarg = lm._cache_kwarg
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True, **{kwarg: cache})
        logits, rows = out.logits[0, -1].float(), []
        for _ in range(steps):
            rows.append(logits)
            out = lm.model(input_ids=logits.argmax().view(1, 1), use_cache=True, **{kwarg: cache})
            logits = out.logits[0, -1].float()
    return torch.stack(rows)  # (steps, V)


@pytest.mark.slow
def test_prompt_cache_rows_decode_like_a_fresh_prefill(lm, monkeypatch):
    """Rows restarted at different times from the prompt cache (hits) and from a new prefill (misses)
    give the logits of transformers' own prefill + decode of that prompt, over 16 steps."""
    lm.prompt_cache.clear()
    ids = lm.encode(PROMPTS)
    computed = []
    original = lm._compute
    monkeypatch.setattr(lm, "_compute", lambda p: computed.append(len(p)) or original(p))
    logits, state = lm.prefill([ids[0], ids[1], ids[0]])
    assert computed == [2]  # the repeated prompt ran once
    assert torch.equal(logits[0], logits[2])
    restart_at = {3: (1, ids[0]), 7: (2, ids[3]), 9: (0, ids[1])}  # step -> (row, prompt): hit, miss, hit
    traces = {row: [] for row, _ in restart_at.values()}
    started = {}
    for step in range(9 + 16):
        if step in restart_at:
            row, prompt = restart_at[step]
            new = lm.replace_rows(state, [row], [prompt])
            logits = logits.clone()
            logits[row] = new[0]
            started[row] = prompt
        for row in started:
            if len(traces[row]) < 16:
                traces[row].append(logits[row])
        logits = lm.decode(state, logits.argmax(-1))
    assert computed == [2, 1]  # only the new prompt ran the model
    assert lm.prompt_cache.hits >= 3 and len(lm.prompt_cache) == 3
    for row, prompt in started.items():
        got, ref = torch.stack(traces[row]), _hf_greedy(lm, prompt, 16)
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-3)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_prompt_cache_is_bounded_least_recently_used_first(lm):
    ids = lm.encode(PROMPTS)
    lm.prompt_cache.clear()
    lm.prefill([ids[0]])
    one = lm.prompt_cache.nbytes
    suffix = len(ids[0]) - len(lm._shared_prefix()[0])  # only the tokens after the shared template prefix are kept
    assert one == lm._n_layers * 2 * lm._kv_heads * suffix * lm._head_dim * 4 + lm.vocab_size * 4
    old_max = lm.prompt_cache.max_bytes
    try:
        lm.prompt_cache.resize(int(2.5 * one))  # room for about two prompts of this size
        lm.prefill([ids[2]])  # "Hi": small
        lm.prefill([ids[0]])  # hit: now the most recently used
        lm.prefill([ids[3]])  # the longest: evicts the least recently used ("Hi") first
        keys = [tuple(k) for k in lm.prompt_cache._entries]
        assert tuple(ids[2]) not in keys and keys[-1] == tuple(ids[3])
        assert lm.prompt_cache.nbytes <= lm.prompt_cache.max_bytes
        lm.prompt_cache.resize(0)  # off: nothing kept, prefill still works
        assert len(lm.prompt_cache) == 0
        logits, _ = lm.prefill([ids[1]])
        assert len(lm.prompt_cache) == 0 and logits.shape == (1, lm.vocab_size)
    finally:
        lm.prompt_cache.resize(old_max)


@pytest.mark.slow
def test_shared_template_prefix_is_computed_once(lm):
    prefix, entry = lm._shared_prefix()
    ids = lm.encode(PROMPTS)
    assert len(prefix) >= 10 and all(tuple(i[: len(prefix)]) == prefix for i in ids)
    assert lm._shared_prefix()[1] is entry  # the same tensors every time
    assert lm.decode_text(list(prefix), skip_special_tokens=False).startswith("<|im_start|>system")


@pytest.mark.slow
def test_replace_rows_restarts_a_row_inside_a_running_batch(lm):
    ids = lm.encode(PROMPTS)
    logits, state = lm.prefill(ids[:3])
    for _ in range(5):
        logits = lm.decode(state, logits.argmax(-1))
    # restart row 1 with the longest prompt (longer than the cache: other rows get left padding)
    new_logits = lm.replace_rows(state, [1], [ids[3]])
    logits = logits.clone()
    logits[1] = new_logits[0]
    reference = _greedy_alone(lm, ids[3], 12)
    for step in range(12):
        torch.testing.assert_close(logits[1], reference[step], atol=2e-3, rtol=1e-3)
        logits = lm.decode(state, logits.argmax(-1))
    # the untouched rows still match their own continuation
    ref0 = _greedy_alone(lm, ids[0], 18)
    torch.testing.assert_close(logits[0], ref0[17], atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_cache_is_cropped_when_long_rows_restart_short(lm):
    ids = lm.encode(PROMPTS)
    _, state = lm.prefill([ids[3], ids[2]])
    long_len = state.length
    lm.replace_rows(state, [0], [ids[2]])  # both rows now short
    assert state.length == len(ids[2]) < long_len
    assert state.attention_mask.all()


@pytest.mark.slow
def test_chat_prompt_gives_readable_english_at_t07(lm):
    ids = lm.encode(["Give me three tips for staying focused while studying."])
    logits, state = lm.prefill(ids)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(40):
        tok = sample(logits, 0.7, generator=g)
        if lm.is_eos(tok).item():
            break
        out.append(int(tok))
        logits = lm.decode(state, tok)
    text = lm.decode_text(out)
    words = text.split()
    assert len(words) >= 15, text
    common = {"the", "to", "a", "and", "of", "your", "you", "for", "is", "in", "it", "on", "with", "can"}
    assert sum(w.lower().strip(".,:;!") in common for w in words) >= 4, text
    assert sum(c.isascii() for c in text) / len(text) > 0.97, text


@pytest.mark.slow
def test_negative_temperature_produces_repetitive_anomalous_tokens(lm):
    ids = lm.encode(["Temperature is a concept"], chat=False)
    logits, state = lm.prefill(ids)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(40):
        tok = sample(logits, -0.001, generator=g)
        out.append(int(tok))
        logits = lm.decode(state, tok)
    counts = collections.Counter(out)
    text = lm.decode_text(out)
    # a small set of anomalous tokens recurs: the most frequent token is one the seeds name
    # ("MetaInfo", "emeteries") and comes back several times in 40 tokens
    top_token, top_count = counts.most_common(1)[0]
    assert top_count >= 4, text
    assert lm.tokenizer.decode([top_token]).strip() in {"MetaInfo", "emeteries"}, text
    assert text.count("MetaInfo") + text.count("emeteries") >= 5, text
    # and the text is not English: the anomaly rules flag it
    from anomaly.rules import text_anomaly_score

    assert text_anomaly_score(text) > 0.5, text


@pytest.mark.slow
def test_bad_inputs_give_clear_errors(lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_causal_lm(ModelConfig(name=str(tmp_path / "missing.gguf")))
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_causal_lm(ModelConfig(name="smollm2-135m-instruc"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(ModelConfig(name=str(tmp_path / "empty_dir")))
    with pytest.raises(ValueError, match="context window"):
        lm.check_fits([[1] * 10], max_new_tokens=lm.max_context)
    with pytest.raises(ValueError, match="empty"):
        lm.encode(["   "])
    logits, _ = lm.prefill(lm.encode(["Hi"]))
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="dtype"):  # ModelConfig checks its fields (from a config: "model.dtype=...")
        load_causal_lm(ModelConfig(dtype="float8"))


def test_gguf_cache_is_keyed_by_the_file_content_not_its_path(tmp_path):
    """Each virtual environment installs its own copy of the embedded GGUF: the copies share one dequantised cache
    (a path- or mtime-keyed cache dequantised each copy again, 0.5 GB a time); a changed byte gets its own."""
    import os

    from envs.lm import _gguf_cache_dir, _Source

    payload = bytes(range(256)) * 4096
    one, two = tmp_path / "venv1", tmp_path / "venv2"
    for d in (one, two):
        d.mkdir()
        (d / "model.gguf").write_bytes(payload)
    os.utime(two / "model.gguf", ns=(1, 1))
    cache = str(tmp_path / "cache")
    first = _gguf_cache_dir(_Source(one, "model.gguf", "m"), cache)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("model-")
    assert _gguf_cache_dir(_Source(two, "model.gguf", "m"), cache) == first
    (two / "model.gguf").write_bytes(payload[:-1] + b"\x00")
    assert _gguf_cache_dir(_Source(two, "model.gguf", "m"), cache) != first
