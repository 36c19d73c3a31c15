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


@pytest.mark.slow
def test_prefill_runs_each_distinct_prompt_once(lm, monkeypatch):
    """A group's G copies of one prompt (env reset and restarts) are prefilled once and copied."""
    ids = lm.encode(PROMPTS[:2])
    batch = [ids[0], ids[1], ids[0], ids[0]]
    calls = []
    original = lm._prefill
    monkeypatch.setattr(lm, "_prefill", lambda p: calls.append(len(p)) or original(p))
    logits, state = lm.prefill(batch)
    monkeypatch.setattr(lm, "dedup_prefill", False)
    ref_logits, ref_state = lm.prefill(batch)
    assert calls == [2, 4]  # 2 distinct prompts run, then all 4 without dedup
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[0], logits[3])
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-3)
    assert torch.equal(state.attention_mask, ref_state.attention_mask)
    assert torch.equal(state.next_position, ref_state.next_position)
    for _ in range(4):  # the copied cache rows decode like their own prefill
        tokens = logits.argmax(-1)
        logits, ref_logits = lm.decode(state, tokens), lm.decode(ref_state, tokens)
        torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-3)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    monkeypatch.setattr(lm, "dedup_prefill", True)
    lm.replace_rows(state, [1, 3], [ids[1], ids[1]])  # restarts dedup too
    assert calls[-1] == 1


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
