"""Load exported temperature policies with torch alone (no stable-baselines3 at inference).

An export directory (written by :mod:`kelvin.export`) holds:

| file              | what                                                                               |
|-------------------|------------------------------------------------------------------------------------|
| ``spec.json``     | the JSON spec below (always)                                                       |
| ``policy.pt``     | learned policies: TorchScript module, raw obs (B, F) -> actions (B, 1) in [-1, 1]  |
| ``token_prior.pt``| per-token anomaly priors (V,) the featurizer used in training (when it used them)  |

``spec.json`` (``format_version`` 1):

| key                 | meaning                                                                                   |
|---------------------|-------------------------------------------------------------------------------------------|
| ``format_version``  | 1; a newer number means a newer Kelvin wrote it (upgrade Kelvin to load it)               |
| ``kind``            | ``"learned"`` (``policy.pt``) or ``"baseline"`` (parameters only, see ``baseline``)       |
| ``feature_spec``    | :meth:`FeatureSpec.to_dict` (its ``version`` must match this Kelvin's featurizer)         |
| ``obs_normalization`` | ``{mean, var, clip, epsilon}`` baked into ``policy.pt`` (null: none / baselines)        |
| ``action_mapping``  | :meth:`ActionMapping.to_dict`: action -> temperature, bounds, rate limit                  |
| ``truncation``      | ``{top_k, top_p, min_p, top_n_sigma}`` applied before the temperature (as in training)    |
| ``model``           | ``{name, vocab_size}``: the base model the policy was trained / configured with           |
| ``baseline``        | baselines: ``policy.to_config()`` (``{"name", "params"}``); null for learned policies     |
| ``guard``           | guard rails the samplers put around the policy (:mod:`policies.guard`): ``{enabled, t_min, t_max, max_delta, safe_range, fallback_temperature, anomaly_threshold, hold}``; absent (older exports): the defaults, on |
| ``files``           | ``{"policy": "policy.pt" or null, "token_prior": "token_prior.pt" or null}``              |
| ``label``, ``source``, ``created``, ``kelvin_version`` | provenance (label for tables, run dir, ISO time)  |

The learned network is :class:`policies.learned.ActorModule` scripted:
``clip(net(clip((obs - mean) / sqrt(var + eps), -clip, clip)), -1, 1)``, with ``net`` the SB3 actor
(``mlp_extractor.policy_net`` + ``action_net``, the Gaussian's mean). Training's validation runs the
same module (:class:`policies.learned.LearnedPolicy`), so the export acts exactly as validated.

:func:`load_policy` returns a :class:`~policies.base.TemperaturePolicy` (the one protocol:
``actions(obs, episode_start) -> (B,)``, with ``predict`` and ``temperatures`` derived): an
:class:`ExportedPolicy` for learned policies, the baseline's own class (e.g.
:class:`~policies.baselines.PIDController`) for baselines. :func:`load_artifact` returns that policy
together with everything a sampler needs (feature spec, action mapping, :class:`~samplers.core.Truncation`,
token prior, guard settings).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec, check_feature_version, upgrade_spec_dict
from policies.guard import GuardSettings, resolve_guard
from policies.learned import LearnedPolicy
from samplers.core import Truncation

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "ArtifactError",
    "ExportedPolicy",
    "PolicyArtifact",
    "SPEC_FILE",
    "POLICY_FILE",
    "TOKEN_PRIOR_FILE",
    "load_artifact",
    "load_policy",
    "quiet_jit",
]

ARTIFACT_FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
POLICY_FILE = "policy.pt"
TOKEN_PRIOR_FILE = "token_prior.pt"
KINDS = ("learned", "baseline")
REQUIRED_KEYS = ("format_version", "kind", "feature_spec", "action_mapping", "truncation", "model")


class ArtifactError(ValueError):
    """An export directory that cannot be loaded; the message names the file and the fix."""


@contextlib.contextmanager
def quiet_jit():
    """TorchScript is deprecated in recent torch (it still works): keep its warnings out of user logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit.*")
        yield


# ---------------------------------------------------------------------- learned policy
class ExportedPolicy(LearnedPolicy):
    """A :class:`~policies.learned.LearnedPolicy` whose network was loaded from ``policy.pt`` (TorchScript):
    the SB3 actor's deterministic action with torch alone."""


# ---------------------------------------------------------------------- artifact
@dataclass
class PolicyArtifact:
    """Everything an export directory holds, loaded: the policy and what a sampler needs around it."""

    path: Path
    spec: dict
    policy: TemperaturePolicy
    feature_spec: FeatureSpec
    action_mapping: ActionMapping
    truncation: Truncation = field(default_factory=Truncation)
    token_prior: torch.Tensor | None = None  # (V,) float32, or None

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def guard(self) -> GuardSettings:
        """The export's guard settings (``spec.json`` ``guard``; the defaults, on, when it has none), resolved."""
        guard = self.spec.get("guard")
        return resolve_guard(True if guard is None else guard, self.action_mapping, owner=f"{self.path} guard")

    @property
    def model(self) -> dict:
        return dict(self.spec.get("model") or {})

    @property
    def diversity_range(self) -> tuple[float, float] | None:
        """The λ range the policy was trained on (``spec.json`` ``diversity.range``), or None."""
        return diversity_range_of(self.spec)

    @property
    def vocab_size(self) -> int | None:
        v = self.model.get("vocab_size")
        return None if v is None else int(v)


def diversity_range_of(spec: dict) -> tuple[float, float] | None:
    """``(low, high)`` of a ``spec.json``'s ``diversity.range``: the λ range a policy conditioned on the diversity
    dial was trained on; None when the export has none (a baseline, or a policy without the dial)."""
    block = spec.get("diversity")
    if not block:
        return None
    rng = block.get("range") if isinstance(block, dict) else None
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise ArtifactError(f"diversity={block!r} must be {{\"range\": [low, high]}}; export the policy "
                            "again") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ArtifactError(f"diversity.range={rng!r} must be finite with 0 <= low <= high; export the "
                            "policy again")
    return lo, hi


def _read_spec(path: Path) -> dict:
    spec_path = path / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"no export directory at {path}; export one with "
                                f"`python -m kelvin.export RUN_DIR {path}`")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file; give the export directory that holds {SPEC_FILE}")
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} is missing: {path} is not a Kelvin export directory "
                                "(export one with `python -m kelvin.export RUN_DIR OUT_DIR`)")
    text = spec_path.read_text(encoding="utf-8", errors="replace")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{spec_path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                            "the file is corrupted or truncated: export the policy again") from None
    if not isinstance(spec, dict):
        raise ArtifactError(f"{spec_path} must hold a JSON object; got {type(spec).__name__}: export the policy again")
    version = spec.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{spec_path}: format_version={version!r} must be an integer; export the policy again")
    if version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{spec_path} has format_version {version}, newer than this Kelvin reads "
                            f"({ARTIFACT_FORMAT_VERSION}): it was exported by a newer Kelvin; "
                            "upgrade Kelvin to load it")
    if version < 1:
        raise ArtifactError(f"{spec_path}: format_version={version} is not a valid version (>= 1)")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ArtifactError(f"{spec_path} lacks the keys {missing}; the file is incomplete: export the policy again")
    if spec["kind"] not in KINDS:
        raise ArtifactError(f"{spec_path}: kind={spec['kind']!r} is unknown; expected one of {KINDS}")
    return spec


def _feature_spec(spec: dict, spec_path: Path) -> FeatureSpec:
    d = spec["feature_spec"]
    if not isinstance(d, dict):
        raise ArtifactError(f"{spec_path}: feature_spec must be an object")
    try:
        check_feature_version(d.get("version"))
    except ValueError as exc:
        raise ArtifactError(f"{spec_path}: {exc}") from None
    d = upgrade_spec_dict(d)  # an older export's names (include_diversity_weight, ...): renamed, with a warning
    try:
        fs = FeatureSpec.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{spec_path}: invalid feature_spec ({_first_line(exc)}); export the policy again") from None
    names = d.get("names")
    if names is not None and list(names) != list(fs.names):
        raise ArtifactError(f"{spec_path}: feature names {names} differ from this featurizer's {list(fs.names)} "
                            "for the same spec; retrain the policy or use the Kelvin release it was exported with")
    return fs


def _first_line(exc: Exception) -> str:
    """A pydantic error's problem in one line (its first error), or the message of any other error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


def _action_mapping(spec: dict, spec_path: Path) -> ActionMapping:
    values = spec["action_mapping"]
    if not isinstance(values, dict):
        raise ArtifactError(f"{spec_path}: action_mapping must be an object; export the policy again")
    try:
        return ActionMapping(**values)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{spec_path}: invalid action_mapping ({_first_line(exc)}); export the policy again") from None


def _truncation(spec: dict, spec_path: Path) -> Truncation:
    t = spec["truncation"]
    if t is not None and not isinstance(t, dict):
        raise ArtifactError(f"{spec_path}: truncation must be an object like {Truncation().to_dict()}; got {t!r}")
    try:
        return Truncation.from_dict(t)
    except ValueError as exc:
        raise ArtifactError(f"{spec_path}: invalid truncation ({exc}); export the policy again") from None


def _load_module(path: Path, feature_spec: FeatureSpec) -> torch.nn.Module:
    file = path / POLICY_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a learned-policy export needs its network; export the run again")
    try:
        with quiet_jit():
            module = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError / zip errors for damaged files
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ArtifactError(f"{file} cannot be loaded ({type(exc).__name__}: {first}); "
                            "the file is corrupted: export the run again") from None
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, feature_spec.dim))
    except Exception as exc:
        raise ArtifactError(f"{file} does not accept observations of {feature_spec.dim} features "
                            f"({type(exc).__name__}); it does not belong to this spec.json: "
                            "export the run again") from None
    if tuple(out.shape) != (2, 1):
        raise ArtifactError(f"{file} returns shape {tuple(out.shape)} for (2, {feature_spec.dim}) observations; "
                            "expected (2, 1) actions: export the run again")
    return module


def _load_token_prior(path: Path, name: str | None) -> torch.Tensor | None:
    if not name:
        return None
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing (spec.json lists it as the token prior); export the policy again")
    try:
        prior = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{file} cannot be loaded ({type(exc).__name__}); the file is corrupted: "
                            "export again") from None
    if not isinstance(prior, torch.Tensor) or prior.ndim != 1:
        raise ArtifactError(f"{file} must hold a 1-D (V,) tensor of per-token priors; export again")
    return prior.to(torch.float32)


def load_artifact(path: str | Path) -> PolicyArtifact:
    """Load an export directory: the policy, its feature spec, action mapping, truncation and token prior.

    Raises ``FileNotFoundError`` naming a missing file and :class:`ArtifactError` (a ``ValueError``)
    for a newer ``format_version`` (upgrade Kelvin), a feature-spec version mismatch, corrupted JSON
    or network, or an inconsistent spec.
    """
    path = Path(path).expanduser()
    spec = _read_spec(path)
    spec_path = path / SPEC_FILE
    feature_spec = _feature_spec(spec, spec_path)
    mapping = _action_mapping(spec, spec_path)
    truncation = _truncation(spec, spec_path)
    try:
        diversity_range_of(spec)
    except ArtifactError as exc:
        raise ArtifactError(f"{spec_path}: {exc}") from None
    files = spec.get("files") or {}
    if spec["kind"] == "learned":
        module = _load_module(path, feature_spec)
        policy: TemperaturePolicy = ExportedPolicy(module, feature_spec, mapping,
                                                   label=str(spec.get("label") or "learned (PPO)"))
    else:
        from policies.registry import policy_from_config

        config = spec.get("baseline")
        if not isinstance(config, dict):
            raise ArtifactError(f"{spec_path}: kind='baseline' needs a 'baseline' object ({{'name', 'params'}})")
        try:
            policy = policy_from_config(config, feature_spec, mapping)
        except ValueError as exc:
            raise ArtifactError(f"{spec_path}: cannot rebuild baseline {config.get('name')!r}: {exc}") from None
    guard = spec.get("guard")
    if guard is not None:
        if not isinstance(guard, dict):
            raise ArtifactError(f"{spec_path}: guard={guard!r} must be an object of guard settings "
                                "({\"enabled\": true, \"max_delta\": 0.5, ...}); export the policy again")
        try:
            resolve_guard(guard, mapping, owner=f"{spec_path} guard")
        except ValueError as exc:
            raise ArtifactError(f"{exc}; fix the guard block or export the policy again") from None
    prior = _load_token_prior(path, files.get("token_prior"))
    vocab = (spec.get("model") or {}).get("vocab_size")
    if prior is not None and vocab is not None and prior.shape[0] != int(vocab):
        raise ArtifactError(f"{path / files['token_prior']} has {prior.shape[0]} entries but the model's vocabulary "
                            f"has {vocab}; export the policy again")
    return PolicyArtifact(path=path, spec=spec, policy=policy, feature_spec=feature_spec, action_mapping=mapping,
                          truncation=truncation, token_prior=prior)


def load_policy(path: str | Path):
    """The policy of an export directory, a TemperaturePolicy (the one protocol); needs torch only.

    Learned policies load as :class:`ExportedPolicy`; baselines as their own class with the
    exported parameters (``type(load_policy(d)) is PIDController``).
    """
    return load_artifact(path).policy
