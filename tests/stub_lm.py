"""A stub causal LM with known episode lengths, and the exact-autoreset scenario played on it.

The stub LM (:class:`StubLM`) implements the :class:`envs.lm.CausalLM` interface over an 8-token
vocabulary (EOS = 0). A prompt's text says how its episode goes: ``"len=3 ..."`` ends with EOS as the
3rd token (EOS is the only finite logit once 2 tokens are generated; ``"len=2,4"`` gives even rows 2
tokens and odd rows 4, so the rows of a group end at different times), ``"loop=1,2 ..."`` forces the
non-EOS tokens to cycle 1, 2, 1, 2, ... (otherwise a fixed distribution over tokens 1..7). So the
episode lengths, and hence the ``dones`` array at every step, are known in advance (the pattern of
SB3's ``test_vecenv_terminal_obs`` and Gymnasium's autoreset tests).

A module of its own so that Ray workers can build the stub too (tests/test_distributed.py ships it to
them by value); :func:`check_exact_autoreset` is the scenario both the in-process env
(tests/test_env.py) and the Ray env must pass, array for array.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.config import EnvConfig
from envs.lm import CausalLM
from envs.prompts import CATEGORIES, Prompt
from envs.rewards import CREDIT_TERMS, EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig
from policies.actions import ActionMapping

V = 8
EOS = 0
NO_EMBEDDER = RewardConfig(coherence=0.0, group_semantic=0.0)
SYMMETRIC = ActionMapping(t_min=-2.0, t_max=2.0)  # linear on [-2, 2]: T = 2a, easy to check by hand
# The fixed non-EOS distribution of the stub: EOS masked, tokens 1..7 with increasing logits.
BASE_LOGITS = torch.tensor([-math.inf, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])



class StubState:
    """Per-row progress of the stub: which prompt (registry key) and how many tokens so far."""

    def __init__(self, keys: list[int]):
        self.key = torch.tensor(keys, dtype=torch.long)  # (B,)
        self.generated = torch.zeros(len(keys), dtype=torch.long)  # (B,)
        self.fed: list[torch.Tensor] = []  # tokens given to decode(), one (B,) tensor per call


class StubLM:
    """A deterministic CausalLM with a known episode length per prompt (see the module doc)."""

    def __init__(self, max_context: int = 64):
        self.vocab_size = V
        self.eos_token_ids = torch.tensor([EOS])
        self.device = torch.device("cpu")
        self.tokenizer = None
        self.name = "stub"
        self.max_context = max_context
        self._episodes: list[tuple[int, tuple[int, ...]]] = []  # key -> (length, forced cycle)
        self._keys: dict[str, int] = {}

    check_fits = CausalLM.check_fits  # the real check and message
    is_eos = CausalLM.is_eos

    def encode(self, prompts, chat=None) -> list[list[int]]:
        out = []
        for text in prompts:
            if text not in self._keys:
                fields = dict(w.split("=", 1) for w in text.split() if "=" in w)
                lengths = tuple(int(n) for n in fields.get("len", str(10**6)).split(","))
                cycle = tuple(int(t) for t in fields["loop"].split(",")) if "loop" in fields else ()
                self._keys[text] = len(self._episodes)
                self._episodes.append((lengths, cycle))
            out.append([self._keys[text]] * len(text.split()))  # one id per word: prompt length = words
        return out

    def decode_text(self, ids, skip_special_tokens=True) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == EOS))

    def _logits(self, state: StubState, rows: torch.Tensor) -> torch.Tensor:
        out = []
        for r in rows.tolist():
            lengths, cycle = self._episodes[int(state.key[r])]
            length = lengths[r % len(lengths)]  # "len=2,4": even rows end at 2 tokens, odd rows at 4
            n = int(state.generated[r])
            if n >= length - 1:
                row = torch.full((V,), -math.inf)
                row[EOS] = 0.0
            elif cycle:
                row = torch.full((V,), -math.inf)
                row[cycle[n % len(cycle)]] = 0.0
            else:
                row = BASE_LOGITS.clone()
            out.append(row)
        return torch.stack(out)  # (R, V)

    def prefill(self, prompt_ids):
        state = StubState([ids[0] for ids in prompt_ids])
        return self._logits(state, torch.arange(len(prompt_ids))), state

    def decode(self, state: StubState, tokens: torch.Tensor) -> torch.Tensor:
        state.fed.append(tokens.clone())
        state.generated += 1
        return self._logits(state, torch.arange(state.key.shape[0]))

    def replace_rows(self, state: StubState, rows, prompt_ids) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).view(-1)
        state.key[rows] = torch.tensor([ids[0] for ids in prompt_ids])
        state.generated[rows] = 0
        return self._logits(state, rows)


def stub_prompt(i: int, text: str, category: str | None = None) -> Prompt:
    return Prompt(text=text, category=category or CATEGORIES[i], id=f"p{i}")


def obs_col(env, name: str) -> int:
    return env.feature_spec.index(name)


def category_slot(env, obs_row: np.ndarray) -> int:
    start = obs_col(env, f"category_{CATEGORIES[0]}")
    onehot = obs_row[start:start + len(CATEGORIES)]  # the diversity weight λ follows the one-hot
    assert sorted(onehot.tolist()) == [0.0] * (len(onehot) - 1) + [1.0]
    return int(onehot.argmax())


# --------------------------------------------------------------------------- the exact-autoreset scenario

# Five prompts with episode lengths 1, 2, 3, 4, 6 (EOS as token L); max_new_tokens = 4, so prompt 3
# ends with EOS exactly at the limit (terminated, not truncated) and prompt 4 is truncated at 4.
STUB_LENGTHS = [1, 2, 3, 4, 6]
STUB_PROMPTS = [stub_prompt(i, f"len={n} tell me something") for i, n in enumerate(STUB_LENGTHS)]
HORIZON = 4
# seed 0: order = permutation(5) = [2, 4, 3, 0, 1]; 2 groups, group g's k-th prompt is
# order[(g + 2k) % 5]: group 0 (rows 0, 1) plays prompts 2, 3, 1, 4, 0 (lengths 3, 4, 2, 4T, 1),
# group 1 (rows 2, 3) plays 4, 0, 2, 3, 1 (lengths 4T, 1, 3, 4, 2). T = truncated.
GROUP_PROMPTS = {0: [2, 3, 1, 4, 0, 2], 1: [4, 0, 2, 3, 1, 4]}  # k = 5 wraps around
EXPECTED_DONES = [  # step 1 .. 14
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [1, 1, 0, 0],  # group 0: prompt 2 (len 3) ends with EOS
    [0, 0, 1, 1],  # group 1: prompt 4 truncated at 4 tokens
    [0, 0, 1, 1],  # group 1: prompt 0 (len 1): EOS as its first token
    [0, 0, 0, 0],
    [1, 1, 0, 0],  # group 0: prompt 3 (len 4): EOS exactly at the limit -> terminated
    [0, 0, 1, 1],  # group 1: prompt 2 (len 3)
    [1, 1, 0, 0],  # group 0: prompt 1 (len 2)
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 1, 1],  # group 1: prompt 3 (len 4)
    [1, 1, 0, 0],  # group 0: prompt 4 truncated
    [1, 1, 1, 1],  # group 0: prompt 0 (len 1); group 1: prompt 1 (len 2)
]


def stub_config(batch_size=4, group_size=2, max_new_tokens=HORIZON, seed=0, action=SYMMETRIC, **fields) -> EnvConfig:
    """The env settings of the stub scenarios (no token prior: the stub has no tokenizer)."""
    return EnvConfig(batch_size=batch_size, group_size=group_size, max_new_tokens=max_new_tokens, token_prior=False,
                     seed=seed, action=action, **fields)


def check_exact_autoreset(env) -> None:
    """Play 14 steps of seeded random actions on a fresh 4-row env of ``stub_config()`` over ``STUB_PROMPTS`` and
    check every array: dones, observations, temperatures, returns, terminal observations, truncation flags."""
    assert np.random.default_rng(0).permutation(5).tolist() == [2, 4, 3, 0, 1]  # the schedule above
    assert env.num_envs == 4
    pos, prev_t = obs_col(env, "position"), obs_col(env, "prev_temperature")
    surprise, drawn = obs_col(env, "last_surprise"), obs_col(env, "mean_drawn_prob")
    entropy = obs_col(env, "entropy")
    obs = env.reset()
    assert obs.shape == (4, env.feature_spec.dim) and obs.dtype == np.float32
    episode = {r: 0 for r in range(4)}  # index k of each row's current episode
    prompt_of = lambda r: GROUP_PROMPTS[r // 2][episode[r]]  # noqa: E731
    assert [category_slot(env, obs[r]) for r in range(4)] == [prompt_of(r) for r in range(4)]
    assert obs[:, pos].tolist() == [0.0] * 4 and obs[:, prev_t].tolist() == [1.0] * 4
    n_tokens = np.zeros(4, dtype=int)
    returns = np.zeros(4)
    rng = np.random.default_rng(123)
    for step, expected in enumerate(EXPECTED_DONES, start=1):
        actions = rng.uniform(-1, 1, size=(4, 1)).astype(np.float32)
        temps = (2.0 * actions[:, 0]).astype(np.float32)  # linear mapping on [-2, 2]: T = 2a
        obs, rewards, dones, infos = env.step(actions)
        n_tokens += 1
        returns += rewards
        assert dones.dtype == bool and dones.astype(int).tolist() == expected, f"step {step}"
        assert obs.shape == (4, env.feature_spec.dim) and obs.dtype == np.float32
        assert rewards.shape == (4,) and np.isfinite(rewards).all()
        assert [i["temperature"] for i in infos] == pytest.approx(temps.tolist(), abs=1e-6)
        for r in range(4):
            info = infos[r]
            old_prompt = prompt_of(r)
            assert set(info["reward_components"]) == set(STEP_COMPONENTS + EPISODE_COMPONENTS + CREDIT_TERMS)
            if not dones[r]:  # the row goes on, untouched by the others' resets
                assert "terminal_observation" not in info and "episode" not in info
                assert "TimeLimit.truncated" not in info
                assert obs[r, pos] == pytest.approx(n_tokens[r] / HORIZON)
                assert obs[r, prev_t] == pytest.approx(temps[r], abs=1e-6)
                assert category_slot(env, obs[r]) == old_prompt
                continue
            length = min(STUB_LENGTHS[old_prompt], HORIZON)
            truncated = STUB_LENGTHS[old_prompt] > HORIZON
            assert n_tokens[r] == length
            assert info["TimeLimit.truncated"] is truncated
            assert info["episode"]["l"] == length
            assert info["episode"]["r"] == pytest.approx(returns[r], rel=1e-6, abs=1e-6)
            assert info["prompt_id"] == f"p{old_prompt}"
            assert len(info["temperatures"]) == length and info["temperatures"][-1] == pytest.approx(temps[r], abs=1e-6)
            # the terminal observation is the one computed after the last token, before the reset
            term = info["terminal_observation"]
            assert term.shape == (env.feature_spec.dim,) and term.dtype == np.float32
            assert term[pos] == pytest.approx(length / HORIZON)
            assert term[prev_t] == pytest.approx(temps[r], abs=1e-6)
            assert category_slot(env, term) == old_prompt
            # the returned observation is the first one of the next episode
            episode[r] += 1
            new_prompt = prompt_of(r)
            assert obs[r, pos] == 0.0 and obs[r, prev_t] == 1.0
            assert obs[r, surprise] == 0.0 and obs[r, drawn] == 1.0
            assert category_slot(env, obs[r]) == new_prompt
            # a len-1 prompt starts with EOS as the only finite logit: zero entropy; others do not
            assert (obs[r, entropy] == 0.0) == (STUB_LENGTHS[new_prompt] == 1)
            n_tokens[r] = 0
            returns[r] = 0.0
    assert [episode[r] for r in range(4)] == [5, 5, 5, 5]


def bins_model(tmp_path, *settings):
    """(config, env, model, normaliser): the training's own PPO model (kelvin.training._new_model, diversity heads,
    gSDE) on a 4-row stub env with position bins [2] over 6 tokens; ``settings`` are more ``--set`` lines."""
    from envs.generation import TemperatureVecEnv
    from kelvin.config_loading import load_config
    from kelvin.rundir import RunDir
    from kelvin.training import _new_model

    config = load_config(None, ["env.features.position_bins=[2]", "env.max_new_tokens=6", "env.batch_size=4",
                                "env.group_size=2", "env.token_prior=false", "ppo.n_steps=4", "ppo.batch_size=8",
                                *settings])
    env = TemperatureVecEnv(config.env, lm=StubLM(), reward=NO_EMBEDDER, prompts=STUB_PROMPTS)
    return (config, env, *_new_model(config, RunDir(tmp_path), env, start_at_base=True))
