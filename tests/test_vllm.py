"""The vLLM logits processors (samplers/vllm.py) against vLLM's documented semantics, without vLLM.

vLLM has no CPU wheel, so vLLM's own classes are replaced by stand-ins that follow its interfaces as
written in its source (see the module doc of samplers/vllm.py):

* :class:`FakeRunnerV2` plays Model Runner V2: request slots from a free list, never moved; ``add_request``
  when a request enters; ``apply_staged_writes`` once per step; ``apply(logits, ctx)`` with the rows in any
  order, mapped to slots by ``ctx.expanded_idx_mapping``; after sampling, the token lands in
  ``all_token_ids[slot, total_len]`` and ``total_len`` grows by one; a resumed (preempted) request is
  added again with its partial output in its prefill.
* ``BatchUpdate`` of the legacy V1 interface is a namespace with ``batch_size``, ``removed``, ``added``
  ``(row, params, prompt_ids, output_ids)`` (the live output list) and ``moved`` ``(a, b, SWAP | UNIDIRECTIONAL)``.

Each request's temperatures must equal those of the same request run alone through the transformers
processor built from the same export (fresh state, same logits, same tokens), to 1e-6.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from policies.actions import ActionMapping
from policies.baselines import FixedTemperature
from kelvin.export import export_baseline
from policies.features import FeatureSpec
from policies.registry import make_policy
from samplers.core import apply_temperature, truncate
from samplers.hf import PolicyLogitsProcessor
from samplers.vllm import (KelvinLegacyLogitsProcessor, KelvinLogitsProcessor, make_logits_processor,
                           request_options)

SPEC = FeatureSpec(horizon=8, categories=("code", "creative"), include_diversity=True)
MAPPING = ActionMapping(kind="linear", t_min=-2.0, t_max=2.0, max_delta=0.75)
V = 50
PROMPT = [7, 8, 9]


def _params(temperature=1.0, **extra):
    """A stand-in for vllm.SamplingParams: the fields the processors read."""
    return SimpleNamespace(temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                           frequency_penalty=0.0, presence_penalty=0.0, extra_args=extra or None)


def _config(capacity=4, model_config=None):
    """A stand-in for vllm.config.VllmConfig: the fields the processors read."""
    return SimpleNamespace(speculative_config=None, model_config=model_config,
                           scheduler_config=SimpleNamespace(max_num_seqs=capacity))


@pytest.fixture(scope="module")
def pid_export(tmp_path_factory):
    return export_baseline(make_policy("pid", SPEC, MAPPING), tmp_path_factory.mktemp("vllm") / "pid",
                           {"top_k": 10}, {"name": "toy", "vocab_size": V})


class _Buffer:
    """vLLM's UvaBackedTensor / StagedWriteTensor: a host view ``np`` and a device view ``gpu`` (one CPU tensor)."""

    def __init__(self, tensor: torch.Tensor):
        self.gpu = tensor
        self.np = tensor.numpy()


class FakeRunnerV2:
    """Drives a processor as Model Runner V2 does (the module doc)."""

    def __init__(self, processor_class, capacity=4, max_len=64):
        self.tokens = torch.zeros((capacity, max_len), dtype=torch.int32)
        self.prompt_len, self.prefill_len, self.total_len = (torch.zeros(capacity, dtype=torch.int32) for _ in range(3))
        req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=capacity, vocab_size=V,
                                     all_token_ids=_Buffer(self.tokens), prompt_len=_Buffer(self.prompt_len),
                                     prefill_len=_Buffer(self.prefill_len), total_len=_Buffer(self.total_len))
        self.proc = processor_class(_config(capacity), req_states)
        self.free = list(range(capacity - 1, -1, -1))
        self.slot: dict[str, int] = {}

    def add(self, req, params, prompt=PROMPT, output=(), slot=None) -> bool:
        """A request enters (the free list's next slot, or ``slot``); ``output``: tokens generated before a
        preemption, prefilled again with the prompt."""
        slot = self.free.pop() if slot is None else self.free.pop(self.free.index(slot))
        self.slot[req] = slot
        prefill = [*prompt, *output]
        self.tokens[slot, :len(prefill)] = torch.tensor(prefill)
        self.prompt_len[slot], self.prefill_len[slot], self.total_len[slot] = len(prompt), len(prefill), len(prefill)
        return self.proc.add_request(slot, params)

    def remove(self, req) -> None:
        self.free.append(self.slot.pop(req))

    def step(self, rows: list[str], logits: torch.Tensor, seq_lens=None) -> torch.Tensor:
        """``apply`` on ``logits`` (R, V), row i of request ``rows[i]``; ``seq_lens`` overrides a row's
        visible length (a chunk of a prefill)."""
        self.proc.apply_staged_writes()
        slots = np.array([self.slot[r] for r in rows], dtype=np.int64)
        seq = self.total_len.numpy()[slots].astype(np.int64) if seq_lens is None else np.asarray(seq_lens)
        mapping = torch.as_tensor(slots, dtype=torch.int32)
        ctx = SimpleNamespace(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=slots,
                              expanded_local_pos=torch.zeros(len(rows), dtype=torch.int32),
                              input_ids=torch.zeros(len(rows), dtype=torch.int32),
                              pos=torch.as_tensor(seq - 1, dtype=torch.int32), seq_lens_upper_bound_np=seq)
        return self.proc.apply(logits, ctx)

    def commit(self, req, token: int) -> None:
        slot = self.slot[req]
        self.tokens[slot, int(self.total_len[slot])] = token
        self.total_len[slot] += 1

    def temperature(self, req) -> float:
        return float(self.proc.slots.runtime.last_temperature[self.slot[req]])


def _stream(steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, generator=g) * 2 for _ in range(steps)]


def _draw(row: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))


def _alone(export, logits, tokens, category=None, diversity=None, prompt=PROMPT) -> list[float]:
    """Temperatures of one request run alone through the transformers processor (the reference)."""
    proc = PolicyLogitsProcessor.from_pretrained(export, category=category, diversity=diversity)
    ids = torch.tensor([prompt])
    for z, tok in zip(logits, tokens):
        proc(ids, z.view(1, -1))
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return proc.temperature_trace()[0].tolist()


# =========================================================================== Model Runner V2
def test_v2_slots_follow_requests_through_reordering_and_slot_reuse(pid_export):
    """Rows come in any order each step; A finishes and D reuses its slot with fresh state."""
    runner = FakeRunnerV2(make_logits_processor(pid_export), capacity=3)
    cats = {"A": "code", "B": None, "C": "creative", "D": None}
    streams = {r: _stream(6, seed=i) for i, r in enumerate("ABCD")}
    got = {r: [] for r in "ABCD"}
    drawn = {r: [] for r in "ABCD"}
    g = torch.Generator().manual_seed(0)
    for r in "ABC":
        assert runner.add(r, _params(kelvin_category=cats[r]) if cats[r] else _params()) is True
    schedule = [["A", "B", "C"], ["C", "A", "B"], ["B", "C", "A"], ["A", "C", "B"], ["D", "B", "C"], ["C", "D", "B"]]
    for step, rows in enumerate(schedule):
        if step == 4:  # A finished after 4 tokens; D enters A's freed slot
            slot_a = runner.slot["A"]
            runner.remove("A")
            runner.add("D", _params())
            assert runner.slot["D"] == slot_a
        logits = torch.stack([streams[r][len(got[r])] for r in rows])
        before = logits.clone()
        out = runner.step(rows, logits)
        assert torch.equal(logits, before)  # vLLM's tensor is not edited in place
        for i, r in enumerate(rows):
            got[r].append(runner.temperature(r))
            drawn[r].append(_draw(out[i], g))
            runner.commit(r, drawn[r][-1])
    for r in "ABCD":
        reference = _alone(pid_export, streams[r][:len(got[r])], drawn[r], category=cats[r])
        np.testing.assert_allclose(got[r], reference, atol=1e-6, rtol=0)
    assert len(got["D"]) == 2 and len(got["A"]) == 4


def test_v2_n_samples_of_one_prompt_keep_independent_state(pid_export):
    """SamplingParams(n=3): vLLM runs three requests with one prompt and one SamplingParams (issue #28233)."""
    runner = FakeRunnerV2(make_logits_processor(pid_export), capacity=4)
    params = _params(kelvin_category="creative")
    for k in range(3):
        runner.add(f"s{k}", params)
    stream = _stream(5, seed=11)  # the same logits for the three samples at every step...
    g = torch.Generator().manual_seed(3)
    got, drawn = {f"s{k}": [] for k in range(3)}, {f"s{k}": [] for k in range(3)}
    rows = ["s0", "s1", "s2"]
    for step in range(5):
        out = runner.step(rows, torch.stack([stream[step]] * 3))
        for i, r in enumerate(rows):
            got[r].append(runner.temperature(r))
            drawn[r].append(_draw(out[i], g))  # ...but each sample draws its own tokens
            runner.commit(r, drawn[r][-1])
    assert len({tuple(d) for d in drawn.values()}) == 3
    assert len({tuple(np.round(t, 6)) for t in got.values()}) == 3  # the histories, hence the temperatures, differ
    for r in rows:
        np.testing.assert_allclose(got[r], _alone(pid_export, stream, drawn[r], category="creative"), atol=1e-6,
                                   rtol=0)


def test_v2_preempted_request_restarts_clean(pid_export):
    """A preempted request is added again (maybe to another slot, which held someone else) with its partial
    output in the prefill: its state starts afresh there, nothing of the slot's previous occupant stays."""
    runner = FakeRunnerV2(make_logits_processor(pid_export), capacity=2)
    runner.add("A", _params())
    runner.add("B", _params(kelvin_category="code"))
    first, later = _stream(3, seed=5), _stream(3, seed=6)
    g = torch.Generator().manual_seed(1)
    drawn_a = []
    for step in range(3):
        out = runner.step(["A", "B"], torch.stack([first[step], later[step]]))
        drawn_a.append(_draw(out[0], g))
        runner.commit("A", drawn_a[-1])
        runner.commit("B", _draw(out[1], g))
    slot_b = runner.slot["B"]
    runner.remove("B")  # B finished
    runner.remove("A")  # A preempted: it leaves the batch...
    runner.add("A2", _params(), output=drawn_a, slot=slot_b)  # ...and comes back in B's old slot
    resumed = _stream(3, seed=7)
    got, drawn = [], []
    for step in range(3):
        out = runner.step(["A2"], resumed[step].view(1, -1))
        got.append(runner.temperature("A2"))
        drawn.append(_draw(out[0], g))
        runner.commit("A2", drawn[-1])
    # the reference: a fresh request whose prompt is A's prompt and partial output
    np.testing.assert_allclose(got, _alone(pid_export, resumed, drawn, prompt=[*PROMPT, *drawn_a]), atol=1e-6, rtol=0)


def test_v2_rows_in_chunked_prefill_are_left_alone(pid_export):
    runner = FakeRunnerV2(make_logits_processor(pid_export), capacity=2)
    runner.add("A", _params())
    runner.add("L", _params(), prompt=list(range(1, 21)))  # a long prompt, prefilled in chunks
    stream_a, stream_l = _stream(3, seed=8), _stream(2, seed=9)
    junk = torch.randn(V) * 5
    g = torch.Generator().manual_seed(2)
    drawn_a, drawn_l, got_a, got_l = [], [], [], []
    # step 0: L has seen 8 of its 20 prompt tokens; its row's sample is discarded, its state must not move
    out = runner.step(["A", "L"], torch.stack([stream_a[0], junk]), seq_lens=[len(PROMPT), 8])
    assert torch.equal(out[1], junk)
    got_a.append(runner.temperature("A"))
    drawn_a.append(_draw(out[0], g))
    runner.commit("A", drawn_a[-1])
    for step in range(2):
        out = runner.step(["A", "L"], torch.stack([stream_a[step + 1], stream_l[step]]))
        got_a.append(runner.temperature("A"))
        got_l.append(runner.temperature("L"))
        drawn_a.append(_draw(out[0], g))
        drawn_l.append(_draw(out[1], g))
        runner.commit("A", drawn_a[-1])
        runner.commit("L", drawn_l[-1])
    np.testing.assert_allclose(got_a, _alone(pid_export, stream_a, drawn_a), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_l, _alone(pid_export, stream_l, drawn_l, prompt=list(range(1, 21))), atol=1e-6,
                               rtol=0)


def test_negative_temperature_keeps_vllm_masks(tmp_path):
    """Grammar / bad-words masks (-inf) stay -inf after T = -0.5; the inversion happens among the allowed
    tokens inside the export's top-k, in both adapters."""
    export = export_baseline(FixedTemperature(SPEC, MAPPING, t=-0.5), tmp_path / "neg", {"top_k": 5},
                             {"name": "toy", "vocab_size": V}, guard=False)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g) * 3
    allowed = torch.rand(3, V, generator=g) < 0.3
    allowed[:, 0] = True
    allowed[2] = False
    allowed[2, 17] = True  # a grammar that leaves one token
    masked = logits.masked_fill(~allowed, float("-inf"))
    runner = FakeRunnerV2(make_logits_processor(export), capacity=3)
    for r in "abc":
        runner.add(r, _params())
    legacy = make_logits_processor(export, interface="v1")(_config(3), torch.device("cpu"), False)
    legacy.update_state(SimpleNamespace(batch_size=3, removed=[], moved=[],
                                        added=[(i, _params(), PROMPT, []) for i in range(3)]))
    for out in (runner.step(["a", "b", "c"], masked.clone()), legacy.apply(masked.clone())):
        assert not torch.isnan(out).any() and not torch.isposinf(out).any()
        assert torch.isneginf(out[~allowed]).all()  # nothing vLLM masked came back
        expected = apply_temperature(truncate(masked, top_k=5), -0.5)
        torch.testing.assert_close(out, expected)
        kept = masked.topk(5).indices  # (3, 5) the allowed top 5, most likely first
        for row in range(2):
            assert int(out[row].argmax()) == int(kept[row, -1])  # the least likely of the kept allowed tokens
        assert int(out[2].argmax()) == 17 and torch.isfinite(out[2]).sum() == 1


def test_v2_request_options(tmp_path, pid_export):
    runner = FakeRunnerV2(make_logits_processor(pid_export), capacity=3)
    assert runner.add("off", _params(temperature=0.3, kelvin="off")) is False  # vllm_xargs carries strings
    assert runner.add("dial", _params(kelvin_category="code", kelvin_diversity="0.75")) is True
    assert runner.add("on", _params(kelvin=1)) is True
    z = torch.randn(3, V)
    out = runner.step(["off", "dial", "on"], z.clone())
    assert torch.equal(out[0], z[0])  # an opted-out request's logits are untouched
    state = runner.proc.slots.runtime.featurizer.state
    slot = runner.slot["dial"]
    assert float(state.diversity[slot]) == 0.75 and int(state.category[slot]) == SPEC.categories.index("code")
    assert int(state.category[runner.slot["on"]]) == len(SPEC.categories)  # "other"
    opts = request_options(_params(kelvin="false"))
    assert opts.enabled is False
    # validate_params runs at admission (in the frontend) and names the setting and the fix
    proc_class = make_logits_processor(pid_export)
    with pytest.raises(ValueError, match=r"SamplingParams.temperature=0.7.*use temperature=1.0"):
        proc_class.validate_params(_params(temperature=0.7))
    proc_class.validate_params(_params(temperature=0.7, kelvin=False))  # opted out: anything goes
    with pytest.raises(ValueError, match=r"\['kelvin_categroy'\] is not a Kelvin option; did you mean 'kelvin_category'"):
        proc_class.validate_params(_params(kelvin_categroy="code"))
    with pytest.raises(ValueError, match="unknown category 'cod'; did you mean 'code'"):
        proc_class.validate_params(_params(kelvin_category="cod"))
    with pytest.raises(ValueError, match="kelvin_diversity'\\]='lots' must be a finite number"):
        proc_class.validate_params(_params(kelvin_diversity="lots"))
    with pytest.raises(ValueError, match="kelvin'\\]='maybe' must be true/false"):
        proc_class.validate_params(_params(kelvin="maybe"))
    plain = export_baseline(make_policy("edt", FeatureSpec(horizon=8), MAPPING), tmp_path / "plain")
    with pytest.raises(ValueError, match="this policy has no diversity dial"):
        make_logits_processor(plain).validate_params(_params(kelvin_diversity=0.5))
    with pytest.raises(ValueError, match="this policy has no category features"):
        make_logits_processor(plain).validate_params(_params(kelvin_category="code"))
    ranged = export_baseline(make_policy("pid", SPEC, MAPPING), tmp_path / "ranged", diversity_range=(0.0, 1.0))
    make_logits_processor(ranged).validate_params(_params(kelvin_diversity="1.0"))
    with pytest.raises(ValueError, match=r"kelvin_diversity'\]=1.5 is outside the range the policy was trained on "
                                         r"\[0, 1\]"):
        make_logits_processor(ranged).validate_params(_params(kelvin_diversity="1.5"))
    runner = FakeRunnerV2(make_logits_processor(ranged), capacity=1)
    with pytest.raises(ValueError, match="outside the range the policy was trained on"):
        runner.add("hot", _params(kelvin_diversity=2))


def test_refuses_speculative_decoding_another_model_and_a_missing_export(pid_export, monkeypatch):
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=2)
    proc_class = make_logits_processor(pid_export)
    with pytest.raises(ValueError, match="does not support speculative decoding"):
        proc_class(SimpleNamespace(speculative_config=object(), model_config=None), req_states)
    other = SimpleNamespace(model="Qwen/Qwen2.5-0.5B-Instruct", get_vocab_size=lambda: 151936)
    with pytest.raises(ValueError, match=r"exported for model 'toy' \(vocabulary 50\) but the engine runs "
                                         r"'Qwen/Qwen2.5-0.5B-Instruct' \(vocabulary 151936\)"):
        proc_class(_config(model_config=other), req_states)
    same_vocab = SimpleNamespace(model="org/another-toy", get_vocab_size=lambda: V)
    with pytest.raises(ValueError, match="KELVIN_MODEL_CHECK=vocab"):
        make_logits_processor(pid_export, interface="v1")(_config(model_config=same_vocab), torch.device("cpu"))
    monkeypatch.setenv("KELVIN_MODEL_CHECK", "vocab")  # the same model under another name
    make_logits_processor(pid_export, interface="v1")(_config(model_config=same_vocab), torch.device("cpu"))
    monkeypatch.delenv("KELVIN_POLICY", raising=False)
    with pytest.raises(ValueError, match="set the KELVIN_POLICY environment variable"):
        KelvinLogitsProcessor.validate_params(_params())
    monkeypatch.setenv("KELVIN_POLICY", str(pid_export.parent / "nowhere"))
    with pytest.raises(FileNotFoundError, match="is not a Kelvin export directory"):
        KelvinLegacyLogitsProcessor.validate_params(_params())
    with pytest.raises(ValueError, match="interface='v3' must be 'v2'"):
        make_logits_processor(pid_export, interface="v3")


# =========================================================================== legacy V1 interface
def _update(size, removed=(), added=(), moved=()):
    return SimpleNamespace(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def test_legacy_batch_updates_follow_requests(pid_export):
    """Removed, added (also over an occupied row), swapped and moved rows: every request keeps its own state."""
    proc = make_logits_processor(pid_export, interface="v1")(_config(4), torch.device("cpu"), False)
    streams = {r: _stream(6, seed=20 + i) for i, r in enumerate("ABCDE")}
    outputs = {r: [] for r in "ABCDE"}  # the live output lists vLLM hands over
    cats = {"A": "code", "B": None, "C": None, "D": "creative", "E": None}

    def added(row, r):
        return row, _params(kelvin_category=cats[r]) if cats[r] else _params(), PROMPT, outputs[r]

    schedule = [
        (_update(2, added=[added(0, "A"), added(1, "B")]), ["A", "B"]),
        (None, ["A", "B"]),
        (_update(3, added=[added(2, "C")], moved=[(0, 1, "SWAP")]), ["B", "A", "C"]),
        (None, ["B", "A", "C"]),
        (_update(2, removed=[0], moved=[(2, 0, SimpleNamespace(name="UNIDIRECTIONAL"))]), ["C", "A"]),
        (_update(2, added=[added(1, "D")]), ["C", "D"]),  # D replaces A in row 1 without a remove
        (_update(3, added=[added(2, "E")]), ["C", "D", "E"]),
        (None, ["C", "D", "E"]),
    ]
    g = torch.Generator().manual_seed(5)
    got = {r: [] for r in "ABCDE"}
    for update, rows in schedule:
        proc.update_state(update)
        logits = torch.stack([streams[r][len(got[r])] for r in rows])
        out = proc.apply(logits)
        for i, r in enumerate(rows):
            slot = proc.rows[i]
            got[r].append(float(proc.slots.runtime.last_temperature[slot]))
            outputs[r].append(_draw(out[i], g))  # the engine appends the drawn token to the live list
    assert sorted(proc.free) == [3] and len(set(proc.rows)) == 3  # A's and B's slots went back and were reused
    for r in "ABCDE":
        np.testing.assert_allclose(got[r], _alone(pid_export, streams[r], outputs[r], category=cats[r]), atol=1e-6,
                                   rtol=0)
    with pytest.raises(ValueError, match="unknown move direction"):
        proc.update_state(_update(3, moved=[(0, 1, "SIDEWAYS")]))
    with pytest.raises(RuntimeError, match="update_state was not called"):
        proc.apply(torch.zeros(5, V))


def test_legacy_opt_out_and_argmax_variance(pid_export):
    proc = make_logits_processor(pid_export, interface="v1")(_config(2), torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False  # vLLM must apply it before its own greedy / sampling split
    proc.update_state(_update(2, added=[(0, _params(temperature=0.2, kelvin=False), PROMPT, []),
                                        (1, _params(), PROMPT, [])]))
    z = torch.randn(2, V)
    out = proc.apply(z.clone())
    assert torch.equal(out[0], z[0]) and not torch.equal(out[1], z[1])
    assert proc.guard_counters["decisions"] == 1  # only the enabled request's row reached the policy
