"""The temperature environments: exact autoreset on a stub LM, the same contract on the real model,
Gymnasium / SB3 ``check_env``, reward directions, seeding, and bad input.

The stub LM and the exact-autoreset scenario live in tests/stub_lm.py (the Ray env plays the same one).
"""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch

import envs
from envs.config import EnvConfig
from envs.generation import TemperatureEnv, TemperatureVecEnv
from envs.generation_core import GenerationCore
from envs.prompts import Prompt
from envs.rewards import CREDIT_TERMS, EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig, RewardFunction
from kelvin.config_loading import load_config
from policies.actions import ActionMapping
from stub_lm import (HORIZON, NO_EMBEDDER, STUB_PROMPTS, SYMMETRIC, StubLM, check_exact_autoreset, obs_col, stub_config,
                     stub_prompt)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread for this module: on a shared 2-core machine, 2 OpenMP threads competing
    with other processes make the real model's forward passes ~10x slower (measured: batch-4
    decode 4.4 s vs 0.18 s). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- 1. exact autoreset (stub)


def _stub_env(batch_size=4, group_size=2, max_new_tokens=HORIZON, prompts=STUB_PROMPTS, seed=0, action=SYMMETRIC):
    config = stub_config(batch_size=batch_size, group_size=group_size, max_new_tokens=max_new_tokens, seed=seed,
                         action=action)
    return TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER, prompts=prompts)


def test_stub_autoreset_exact_arrays_at_every_step():
    check_exact_autoreset(_stub_env())


def test_stub_rows_receive_their_drawn_tokens_and_eos_only_at_the_end():
    env = _stub_env()
    env.reset()
    state = env.core.state
    for _ in range(6):
        env.step(np.zeros((4, 1), dtype=np.float32))  # T = 0: greedy = token 7 (largest logit) until EOS
    fed = torch.stack(state.fed)  # (6, B) tokens the env fed back to the model
    # group 0: prompt 2 (len 3): 7 7 EOS, then prompt 3 (len 4): 7 7 7 ...
    # group 1: prompt 4 (len 6, truncated at 4): 7 7 7 7, then prompt 0 (len 1): EOS, then prompt 2: 7
    assert fed[:, 0].tolist() == [7, 7, 0, 7, 7, 7]
    assert fed[:, 2].tolist() == [7, 7, 7, 7, 0, 7]
    assert torch.equal(fed[:, 0], fed[:, 1]) and torch.equal(fed[:, 2], fed[:, 3])


def test_stub_rows_of_a_group_wait_for_each_other():
    """Row 0 ends at 2 tokens, row 1 at 4 (same prompt, same group): row 0 waits two steps (actions
    ignored, EOS fed, observation held, reward 0), then both end their episode at step 4."""
    prompts = [stub_prompt(0, "len=2,4 loop=7 go"), stub_prompt(1, "len=3 go")]
    env = _stub_env(batch_size=2, group_size=2, max_new_tokens=6, prompts=prompts)
    pos = obs_col(env, "position")
    env.reset()
    first = env.core.episode.prompt.tolist()
    assert first == [0, 0]  # seed 0: permutation(2) = [0, 1]
    seen = []
    for step in range(1, 5):
        obs, rewards, dones, infos = env.step(np.full((2, 1), 0.25 * step, dtype=np.float32))
        seen.append(([i["active"] for i in infos], dones.tolist(), obs[:, pos].tolist(), rewards.tolist()))
    assert [a for a, _, _, _ in seen] == [[True, True], [True, True], [False, True], [False, True]]
    assert [d for _, d, _, _ in seen] == [[False, False]] * 3 + [[True, True]]
    # row 0's observation is held at its terminal one (2 tokens) while it waits
    assert [o[0] for _, _, o, _ in seen[:3]] == pytest.approx([1 / 6, 2 / 6, 2 / 6])
    assert seen[2][3][0] == 0.0  # no reward while waiting
    fed = torch.stack(env.core.state.fed)  # (4, 2)
    assert fed[:, 0].tolist() == [7, 0, 0, 0] and fed[:, 1].tolist() == [7, 7, 7, 0]
    info0, info1 = infos
    assert info0["episode"]["l"] == 2 and info1["episode"]["l"] == 4
    assert info0["waited"] == 2 and info1["waited"] == 0
    assert info0["TimeLimit.truncated"] is False and info1["TimeLimit.truncated"] is False
    assert info0["terminal_observation"][pos] == pytest.approx(2 / 6)
    assert len(info0["temperatures"]) == 2  # the temperatures of its own tokens only
    assert info0["temperatures"].tolist() == pytest.approx([0.5, 1.0])  # T = 2a on [-2, 2]
    assert env.core.episode.prompt.tolist() == [1, 1]  # the group restarted together on the next prompt
    assert obs[:, pos].tolist() == [0.0, 0.0]


def test_stub_step_before_reset_is_a_clear_error():
    env = _stub_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((4, 1), dtype=np.float32))


# --------------------------------------------------------------------------- 2. real model contract


@pytest.mark.slow
def test_real_model_vecenv_contract(lm):
    config = EnvConfig(batch_size=4, group_size=2, max_new_tokens=6, seed=0, action=SYMMETRIC)
    env = TemperatureVecEnv(config, lm=lm)  # default reward: the real MiniLM embedder
    steps: list = []
    core_step = env.core.step
    env.core.step = lambda a: steps.append(core_step(a)) or steps[-1]  # spy on the drawn tokens
    dim = env.feature_spec.dim
    pos = obs_col(env, "position")
    obs = env.reset()
    assert obs.shape == (4, dim) and obs.dtype == np.float32 and np.isfinite(obs).all()
    n_tokens = np.zeros(4, dtype=int)
    ended = np.zeros(4, dtype=bool)
    eos_end = np.zeros(4, dtype=bool)
    returns = np.zeros(4)
    finished = 0
    for _ in range(14):
        obs, rewards, dones, infos = env.step(np.full((4, 1), 0.3, dtype=np.float32))  # T = 0.6
        tokens = steps[-1].tokens
        active = ~ended
        assert [i["active"] for i in infos] == active.tolist()
        n_tokens += active
        returns += rewards
        assert obs.shape == (4, dim) and obs.dtype == np.float32 and np.isfinite(obs).all()
        assert rewards.shape == (4,) and rewards.dtype == np.float32 and np.isfinite(rewards).all()
        eos = lm.is_eos(tokens).numpy()
        eos_end |= active & eos
        ended |= active & (eos | (n_tokens == 6))
        group_done = ended.reshape(2, 2).all(axis=1).repeat(2)
        assert dones.tolist() == group_done.tolist()
        for r, info in enumerate(infos):
            assert info["temperature"] == pytest.approx(0.6)
            assert ("terminal_observation" in info) == bool(dones[r]) == ("episode" in info)
            if not dones[r]:
                if ended[r]:  # waiting: no reward, observation held at 6 or fewer tokens
                    assert rewards[r] == 0.0 and obs[r, pos] == pytest.approx(n_tokens[r] / 6)
                continue
            finished += 1
            assert info["TimeLimit.truncated"] is bool(not eos_end[r])
            assert info["episode"]["l"] == n_tokens[r]
            assert info["temperatures"].tolist() == pytest.approx([0.6] * n_tokens[r])  # not zeroed by the reset
            assert info["episode"]["r"] == pytest.approx(returns[r], rel=1e-5, abs=1e-5)
            assert math.isfinite(info["episode"]["t"]) and info["episode"]["t"] >= 0
            term = info["terminal_observation"]
            assert term.shape == (dim,) and term.dtype == np.float32
            assert term[pos] == pytest.approx(n_tokens[r] / 6)
            assert obs[r, pos] == 0.0
            assert set(info["reward_components"]) == set(STEP_COMPONENTS + EPISODE_COMPONENTS + CREDIT_TERMS)
            assert all(math.isfinite(v) for v in info["reward_components"].values())
            assert isinstance(info["completion"], str)
            if info["TimeLimit.truncated"]:
                assert len(info["completion"]) > 0
            n_tokens[r], returns[r], ended[r], eos_end[r] = 0, 0.0, False, False
    assert finished >= 4  # every row ended at least once (at 6 tokens at the latest)


# --------------------------------------------------------------------------- 3. check_env


@pytest.mark.slow
def test_gymnasium_check_env(lm):
    from gymnasium.utils.env_checker import check_env

    env = gymnasium.make(envs.ENV_ID, lm=lm, max_new_tokens=4).unwrapped
    assert isinstance(env, TemperatureEnv) and env.core.lm is lm
    with pytest.warns(UserWarning, match="infinity"):  # the unbounded Box: raw features by design
        check_env(env, skip_render_check=True)


@pytest.mark.slow
def test_sb3_check_env(lm):
    from stable_baselines3.common.env_checker import check_env

    env = gymnasium.make(envs.ENV_ID, lm=lm, max_new_tokens=4).unwrapped
    check_env(env, warn=True)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)


@pytest.mark.slow
def test_gymnasium_env_episode_end_and_options(lm):
    env = TemperatureEnv(lm=lm, max_new_tokens=3, reward=NO_EMBEDDER, action=SYMMETRIC)
    obs, info = env.reset(seed=0, options={"prompt": "Name a colour."})
    assert info["prompt"] == "Name a colour." and obs.shape == env.observation_space.shape
    ends = []
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(np.array([0.5], dtype=np.float32))  # T = 1
        assert isinstance(reward, float) and math.isfinite(reward)
        ends.append((terminated, truncated))
        if terminated or truncated:
            break
    assert ends[-1] in [(True, False), (False, True)] and all(e == (False, False) for e in ends[:-1])
    assert info["episode"]["l"] == len(ends)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.0], dtype=np.float32))
    env.reset()
    assert info["temperatures"].tolist() == [1.0] * len(ends)  # the finished episode's trace survives a reset


# --------------------------------------------------------------------------- 4. reward directions


def test_repeated_ngram_detection_and_distinct_on_forced_loops():
    prompts = [stub_prompt(0, "loop=5 go"), stub_prompt(1, "loop=1,2 go"), stub_prompt(2, "loop=1,2,3,4,5,6,7 go")]
    config = EnvConfig(batch_size=3, group_size=1, max_new_tokens=8, token_prior=False)
    core = GenerationCore(config, StubLM(), NO_EMBEDDER, prompts)
    core.reset_groups(None, prompt_indices=[0, 1, 2])
    repetition, last = [], None
    for _ in range(8):
        last = core.step(np.full(3, 0.5, dtype=np.float32))  # one finite token per step: forced
        repetition.append(last.components["repetition"].tolist())
    assert core.episode.tokens.tolist() == [[5] * 8, [1, 2] * 4, [1, 2, 3, 4, 5, 6, 7, 1]]
    rep = np.array(repetition).T  # (rows, steps); -1 where the token closes a trigram seen before
    assert rep[0].tolist() == [0, 0, 0, -1, -1, -1, -1, -1]  # 5 5 5 | 5: (5,5,5) again
    assert rep[1].tolist() == [0, 0, 0, 0, -1, -1, -1, -1]  # 1 2 1 2 | 1: (1,2,1) again
    assert rep[2].tolist() == [0] * 8
    assert last.truncated.tolist() == [True] * 3 and last.done.tolist() == [True] * 3


def test_identical_samples_have_no_diversity_on_the_real_embedder():
    model = RewardFunction(RewardConfig())
    prompt = "How do volcanoes erupt?"
    a = "Magma rises through cracks in the crust and erupts as lava and ash."
    b = "My favourite pasta recipe uses garlic and basil."
    out = model.episode_components([[0, 1], [2, 3]], ["v"] * 4, [prompt] * 4, [None] * 4, [a, a, a, b],
                                   [[1, 2, 3]] * 2 + [[1, 2, 3], [4, 5, 6]])
    same, same2, x, y = out["group_semantic"].tolist()
    assert abs(same) < 1e-4 and abs(same2) < 1e-4
    assert x == pytest.approx(y) and x > 0.3
    assert out["group_ngram"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_coherence_prefers_the_on_topic_reply():
    model = RewardFunction(RewardConfig())
    prompt = "How do volcanoes erupt?"
    on = "Magma rises through cracks in the crust and erupts as lava and ash."
    off = "My favourite pasta recipe uses garlic and basil."
    out = model.episode_components([[0], [1]], ["v1", "v2"], [prompt, prompt], [None, None], [on, off],
                                   [[1, 2, 3], [1, 2, 3]])
    on_c, off_c = out["coherence"].tolist()
    assert -1.0 <= off_c < on_c <= 1.0
    assert on_c - off_c > 0.2


def test_text_anomaly_penalises_glitch_tokens():
    model = RewardFunction(NO_EMBEDDER)
    glitch = ("MetaInfo Citizortunatelyemeteriesrossover Confuciforgettable]// advocroximately "
              "MetaInfoemeteries")
    prose = "Magma rises through cracks in the crust and erupts as lava and ash."
    out = model.episode_components([[0, 1]], ["a", "b"], ["x", "x"], [None, None], [glitch, prose], [[1, 2], [1, 2]])
    bad, good = out["text_anomaly"].tolist()
    assert good == 0.0
    assert -1.0 <= bad < -0.3


def test_step_components_clipping_and_entropy_cap():
    model = RewardFunction(RewardConfig(entropy=0.5))  # logprob_clip 10, entropy_cap 3
    tempered = torch.full((3, 64), -math.inf)
    tempered[0, :4] = 0.0  # uniform over 4 kept tokens: ln 4 nats
    tempered[1] = 0.0  # uniform over 64: ln 64 = 4.16 nats > cap
    tempered[2, 7] = 5.0  # one token: 0 nats
    comps = model.step_components(torch.tensor([-20.0, -5.0, 0.0]), torch.tensor([False, True, False]),
                                  torch.tensor([0.0, 1.0, 0.5]), tempered)
    assert comps["logprob"].tolist() == pytest.approx([-1.0, -0.5, 0.0])
    assert comps["repetition"].tolist() == [0.0, -1.0, 0.0]
    assert comps["anomaly"].tolist() == [0.0, -1.0, -0.5]
    assert comps["entropy"].tolist() == pytest.approx([math.log(4) / 3, 1.0, 0.0], abs=1e-6)
    assert math.log(4) / 3 == pytest.approx(0.4621, abs=1e-4)
    # weights: logprob 1, repetition 0.5, anomaly 1 (quality); entropy 0.5 times λ = (1, 2, 0)
    np_comps = {k: v.numpy() for k, v in comps.items()}
    expected = [-1.0 + 1 * 0.5 * math.log(4) / 3, -0.5 - 0.5 - 1.0 + 2 * 0.5, -0.5]
    assert model.combine(np_comps, np.array([1.0, 2.0, 0.0])).tolist() == pytest.approx(expected, abs=1e-6)
    off = RewardFunction(RewardConfig()).step_components(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(3))
    assert off["entropy"].tolist() == [0.0, 0.0, 0.0]  # off by default: no tempered logits needed


def test_diversity_is_scaled_by_lambda_and_quality_is_not():
    model = RewardFunction(RewardConfig())  # correct 6, group_semantic 6, group_ngram 2, coherence 2
    comps = {"correct": np.array([1.0, 1.0]), "group_semantic": np.array([0.5, 0.5]),
             "group_ngram": np.array([0.25, 0.25]), "coherence": np.array([0.5, 0.5])}
    # quality 6 * 1 + 2 * 0.5 = 7; diversity 6 * 0.5 + 2 * 0.25 = 3.5, times λ = 0 and 0.5
    assert model.combine(comps, np.array([0.0, 0.5])).tolist() == pytest.approx([7.0, 8.75])


# --------------------------------------------------------------------------- 5. seeding


def _rollout(env, seed: int, steps: int = 6):
    recorded: list = []
    core_step = env.core.step
    env.core.step = lambda a: recorded.append(core_step(a)) or recorded[-1]
    try:
        env.seed(seed)
        out = [env.reset()]
        for _ in range(steps):
            obs, rewards, dones, _ = env.step(np.full((4, 1), 0.5, dtype=np.float32))  # T = 1
            out += [obs, rewards, dones]
    finally:
        env.core.step = core_step
    return out, torch.stack([r.tokens for r in recorded])  # (steps, B)


@pytest.mark.slow
def test_same_seed_same_rollout_different_seed_different_tokens(lm):
    config = EnvConfig(batch_size=4, group_size=2, max_new_tokens=6)
    prompt = [Prompt("Write one sentence about the sea.", "creative_writing", "sea")]
    env = TemperatureVecEnv(config, lm=lm, reward=NO_EMBEDDER, prompts=prompt)
    first, tokens_a = _rollout(env, 7)
    second, tokens_b = _rollout(env, 7)
    assert len(first) == len(second) == 19
    for x, y in zip(first, second):
        assert np.array_equal(x, y)
    assert torch.equal(tokens_a, tokens_b)
    _, tokens_c = _rollout(env, 8)
    assert not torch.equal(tokens_a, tokens_c)
    assert not torch.equal(tokens_a[:, 0], tokens_a[:, 1])  # rows of a group draw independently


@pytest.mark.slow
def test_rewards_scored_beside_the_decode_are_the_rewards_scored_inline(lm):
    """env.overlap scores finished groups (real MiniLM embeddings) on the side thread while the model
    decodes: every reward, every component and every episode record is the same as scoring them inline."""
    import threading

    prompts = [Prompt("Write one sentence about the sea.", "creative_writing", "sea"),
               Prompt("What is the capital of France?", "factual_qa", "fr", answers=("Paris",))]
    runs = {}
    for overlap in (True, False):
        config = EnvConfig(batch_size=4, group_size=2, max_new_tokens=5, overlap=overlap, seed=3)
        env = TemperatureVecEnv(config, lm=lm, prompts=prompts)
        threads = []
        scorer = env.core._episode_components
        env.core._episode_components = lambda rows: threads.append(threading.current_thread().name) or scorer(rows)
        env.reset()
        steps = []
        actions = np.random.default_rng(0).uniform(-1, 1, size=(12, 4, 1)).astype(np.float32)
        for a in actions:
            obs, rewards, dones, infos = env.step(a)
            steps.append((obs, rewards, dones, [i["reward_components"] for i in infos],
                          [(i["episode"]["r"], i["completion"]) for i in infos if "episode" in i]))
        env.close()
        runs[overlap] = steps
        assert threads and all(n.startswith("kelvin-side-score") == overlap for n in threads), threads
    ended = 0
    for (o1, r1, d1, c1, e1), (o2, r2, d2, c2, e2) in zip(runs[True], runs[False]):
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2) and np.array_equal(d1, d2)
        assert c1 == c2 and e1 == e2
        ended += len(e1)
    assert ended >= 4  # two groups finished, so the semantic and coherence scores really ran
    assert any(c["coherence"] != 0.0 for step in runs[True] for c in step[3])


@pytest.mark.slow
def test_next_prompts_are_prefilled_beside_the_decode(lm):
    """With env.overlap each reset prefills the prompt its groups start next into the prompt cache on the side
    thread, so the restarts themselves find every prompt there (no prefill left for the decoding thread)."""
    from envs.kv_cache import PromptCache

    prompts = [Prompt("Write one sentence about the sea.", "creative_writing", "sea"),
               Prompt("Name a colour.", "creative_writing", "colour"),
               Prompt("What is 2 + 2?", "math", "two", answers=("4",))]
    kept, lm.prompt_cache = lm.prompt_cache, PromptCache(2**30)
    try:
        env = TemperatureVecEnv(EnvConfig(batch_size=4, group_size=2, max_new_tokens=3, overlap=True), lm=lm,
                                reward=NO_EMBEDDER, prompts=prompts)
        cache = lm.prompt_cache
        cache.clear()
        cache.misses = 0
        env.reset()
        env.core.side.wait_prefetch()
        # groups 0 and 1 started on order[0] and order[1]; their next prompts are order[2] and order[0]
        assert (len(cache), cache.misses) == (3, 3)
        restarted = 0
        for _ in range(8):
            _, _, dones, _ = env.step(np.zeros((4, 1), dtype=np.float32))
            restarted += int(dones.sum())
            env.core.side.wait_prefetch()
            assert cache.misses == 3  # every restart and every later prefetch found its prompt prefilled
        assert restarted >= 4
        env.close()
    finally:
        lm.prompt_cache = kept


@pytest.mark.slow
def test_warm_prompts_prefills_schedule_chunks_the_same_bits_however_far_ahead(lm, monkeypatch):
    """warm_prompts(n) prefills the schedule chunks holding every group's next n episodes, one forward pass a
    chunk, so the restarts find them cached. A prompt is always prefilled with the rest of its chunk, whether
    warmed or needed first by an episode, so its cache entry is the same bit for bit however far ahead the env
    warmed; a later env whose chunks are the same finds them cached; and the cache's bound stops the warm-up."""
    import envs.generation_core as core_module
    from envs.kv_cache import PromptCache

    monkeypatch.setattr(core_module, "WARM_BATCH", 2)
    prompts = [Prompt(f"Write one sentence about {w}.", "creative_writing", w)
               for w in ("the sea", "a red kite", "snow", "an old clock", "bread", "a violin")]
    kept = lm.prompt_cache
    calls = []
    real = lm.prefill_together
    monkeypatch.setattr(lm, "prefill_together", lambda ids: (calls.append(len(ids)), real(ids)))

    def fresh_env():
        return TemperatureVecEnv(EnvConfig(batch_size=4, group_size=2, max_new_tokens=3), lm=lm, reward=NO_EMBEDDER,
                                 prompts=prompts)
    try:
        lm.prompt_cache = far = PromptCache(2**30)
        env = fresh_env()
        ids = [tuple(env.core._prompt_ids[i]) for i in env.core._order]  # in schedule order
        assert env.warm_prompts(3)["prompts"] == 6 and calls == [2, 2, 2]  # 2 groups x 3 episodes: three chunks
        env.close()
        env = fresh_env()  # the same prompts and seed (validation's next λ, the next run): the same chunks, cached
        calls.clear()
        assert env.warm_prompts(3)["prompts"] == 0 and calls == []
        env.close()

        lm.prompt_cache = near = PromptCache(2**30)
        near.put(ids[1], far.get(ids[0]))  # a stale entry under a key of chunk 0: replaced, not trusted
        env = fresh_env()
        calls.clear()
        assert env.warm_prompts(1)["prompts"] == 2 and calls == [2]  # next episode of each group: chunk 0
        env.reset()
        for _ in range(3):  # every group ends within max_new_tokens = 3 steps and restarts on chunk 1's prompts
            env.step(np.zeros((4, 1), dtype=np.float32))
        assert calls == [2, 2] and set(near._entries) == set(ids[:4])
        for key in ids[:4]:  # warmed (chunk 0) or prefilled at a restart (chunk 1): the same bits as warmed far ahead
            assert torch.equal(near.get(key).kv, far.get(key).kv) and torch.equal(near.get(key).logits, far.get(key).logits)
        assert env.warm_prompts(0)["prompts"] == 0
        env.close()

        # a cache that holds 2.5 of the first 3 chunks' prompts, one prompt a chunk: it stops before evicting its own
        monkeypatch.setattr(core_module, "WARM_BATCH", 1)
        sizes = [far.get(k).nbytes for k in ids[:3]]
        lm.prompt_cache = PromptCache(sizes[0] + sizes[1] + sizes[2] // 2)
        env = fresh_env()
        calls.clear()
        assert env.warm_prompts(2)["prompts"] == 2 and len(lm.prompt_cache) == 2 and calls == [1, 1]
        env.close()
        lm.prompt_cache = PromptCache(min(sizes) // 2)  # holds none of them: one pass, then it stops
        env = fresh_env()
        calls.clear()
        assert env.warm_prompts(2)["prompts"] == 0 and len(lm.prompt_cache) == 0 and calls == [1]
        env.close()
    finally:
        lm.prompt_cache = kept


# --------------------------------------------------------------------------- 6. bad input


def test_nan_action_raises_naming_action():
    env = _stub_env()
    env.reset()
    actions = np.zeros((4, 1), dtype=np.float32)
    actions[2] = np.nan
    with pytest.raises(ValueError, match="action"):
        env.step(actions)


def test_out_of_range_actions_are_clipped():
    env = _stub_env()
    env.reset()
    _, _, _, infos = env.step(np.array([[5.0], [-5.0], [1.5], [-1.0001]], dtype=np.float32))
    assert [i["temperature"] for i in infos] == [2.0, -2.0, 2.0, -2.0]
    env = _stub_env(action=ActionMapping(kind="inverse", t_min=-2.0, t_max=2.0, max_delta=0.5))
    env.reset()
    # inverse mapping, beta_max = 1 / 0.05 = 20: a = 1 -> beta 20 (T = 0.05), a = -1 -> beta -20 (T = -0.05),
    # a = 0 (either sign of zero) -> beta = 1 / t_max (T = 2); out-of-range actions are clipped to +-1 first.
    _, _, _, infos = env.step(np.array([[1e6], [-1e6], [0.0], [-0.0]], dtype=np.float32))
    assert [i["temperature"] for i in infos] == pytest.approx([0.05, -0.05, 2.0, 2.0], abs=1e-6)
    # the same ends swapped: rows 0 and 1 jump by 0.1, inside the rate limit; rows 2 and 3 ask for +-0.05
    # from T = 2 and are held to 2 - 0.5 = 1.5
    _, _, _, infos = env.step(np.array([[-1e6], [1e6], [1.0], [-1.0]], dtype=np.float32))
    assert [i["temperature"] for i in infos] == pytest.approx([-0.05, 0.05, 1.5, 1.5], abs=1e-6)


def test_empty_prompt_file_is_a_clear_error(tmp_path):
    for name, content in [("empty.jsonl", ""), ("blank.txt", "\n  \n")]:
        path = tmp_path / name
        path.write_text(content)
        config = EnvConfig(prompts=str(path), batch_size=2, group_size=1, token_prior=False)
        with pytest.raises(ValueError, match="contains no prompts"):
            TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER)


def test_prompt_longer_than_the_context_window():
    config = EnvConfig(batch_size=2, group_size=1, max_new_tokens=4, token_prior=False)
    long_prompt = [stub_prompt(0, "len=3 " + "word " * 12)]  # 13 tokens + 4 > 16
    with pytest.raises(ValueError, match="context window"):
        GenerationCore(config, StubLM(max_context=16), NO_EMBEDDER, long_prompt)
    GenerationCore(config, StubLM(max_context=17), NO_EMBEDDER, long_prompt)  # exactly fits


@pytest.mark.slow
def test_huge_max_new_tokens_on_the_real_model(lm):
    config = EnvConfig(batch_size=2, group_size=1, max_new_tokens=lm.max_context)
    with pytest.raises(ValueError, match="context window"):
        TemperatureVecEnv(config, lm=lm, reward=NO_EMBEDDER)


def test_unknown_category_filter():
    with pytest.raises(ValueError, match=r"Unknown category 'creative'.*did you mean 'creative_writing'"):
        TemperatureVecEnv(EnvConfig(categories=["creative"], token_prior=False), lm=StubLM(), reward=NO_EMBEDDER)


@pytest.mark.parametrize("batch_size, group_size", [(4, 3), (4, 0), (2, 4)])
def test_group_size_must_divide_batch_size(batch_size, group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        load_config(None, [f"env.batch_size={batch_size}", f"env.group_size={group_size}"])
    with pytest.raises(ValueError, match="group_size"):  # built in Python: the same check
        EnvConfig(batch_size=batch_size, group_size=group_size)


def test_group_returns_are_relative_in_quality():
    """With λ = 0 every group's episode returns sum to zero: each sample is paid its quality minus the mean
    quality of the others; without the baseline the same episodes pay their absolute quality."""
    prompts = [stub_prompt(0, "len=2,4 go"), stub_prompt(1, "len=3,1 go")]
    returns = {}
    for baseline in (True, False):
        reward = RewardConfig(coherence=0.0, group_semantic=0.0, group_baseline=baseline)
        config = EnvConfig(batch_size=4, group_size=2, max_new_tokens=6, token_prior=False, seed=0,
                           diversity_values=[0.0])
        env = TemperatureVecEnv(config, lm=StubLM(), reward=reward, prompts=prompts)
        env.reset()
        ends = {}
        for _ in range(8):
            _, _, dones, infos = env.step(np.full((4, 1), 0.25, dtype=np.float32))
            for r in np.flatnonzero(dones):
                ends.setdefault(r, infos[r]["episode"]["r"])
        returns[baseline] = ends
    assert sorted(returns[True]) == [0, 1, 2, 3]
    assert returns[True][0] + returns[True][1] == pytest.approx(0.0, abs=1e-5)
    assert returns[True][2] + returns[True][3] == pytest.approx(0.0, abs=1e-5)
    # relative = own absolute minus the other's absolute
    assert returns[True][0] == pytest.approx(returns[False][0] - returns[False][1], abs=1e-5)
    assert returns[False][0] != pytest.approx(returns[False][1])  # the rows really differ (2 vs 4 tokens)


def test_side_threads_run_torch_on_one_thread_and_leave_the_callers_count():
    """A side thread runs torch with one thread whatever the process uses, and the caller keeps its own count: a
    side thread with the process's count keeps a second OpenMP team alive, and on a CPU with fewer cores than
    OpenMP threads every team then sleeps between parallel regions (the model stepped 45% slower, docs/speed.md)."""
    from envs.side_threads import SideThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    side = SideThreads()
    try:
        assert side.score(torch.get_num_threads).result() == 1
        side.prefetch(lambda: None)
        side.wait_prefetch()
        assert side.score(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
    finally:
        side.close()
        torch.set_num_threads(before)


def test_a_kv_window_is_freed_as_soon_as_it_is_dropped():
    """The window's buffers go with its last reference, not at the cyclic collector's next pass (its cache's
    layers point back at it weakly): validation runs drop one window of hundreds of MB per run, and the
    collector, which counts objects rather than bytes, let a checkpoint sweep grow by 2 GB a policy."""
    import copy
    import gc
    import pickle
    import weakref

    from envs.kv_cache import KVWindow

    gc.disable()
    try:
        window = KVWindow(2, 3, 1, 4, 8, torch.float32, torch.device("cpu"))
        window.reserve(2)
        keys, _ = window.cache.layers[1].update(torch.ones(3, 1, 2, 4), torch.ones(3, 1, 2, 4))
        assert keys.shape == (3, 1, 2, 4) and window.kv[1, 0, :, :, :2].eq(1).all()  # written in place
        for copied in (copy.deepcopy(window), pickle.loads(pickle.dumps(window))):  # a cache over its own buffers
            assert copied.cache.layers[1].keys.data_ptr() == copied.kv[1, 0, :, :, 0:0].data_ptr()
            copied.cache.layers[0].update(torch.full((3, 1, 2, 4), 2.0), torch.full((3, 1, 2, 4), 2.0))
            assert copied.kv[0, 0, :, :, :2].eq(2).all() and window.kv[0].eq(0).all()
        freed = weakref.ref(window)
        del window, keys, copied
        assert freed() is None
    finally:
        gc.enable()
