"""The baseline families a learned policy is measured against, each swept into a front.

A family is one way people set the temperature today, swept over its main setting
(``evaluation:`` block of the config, :class:`kelvin.config.EvaluationConfig`):

| family           | policy (spec)                      | truncation     | swept                                   |
|------------------|------------------------------------|----------------|-----------------------------------------|
| `fixed`          | `fixed:T`                          | none           | T (0 = greedy)                          |
| `minp`           | `fixed:T`                          | min-p 0.1      | T                                       |
| `topp`           | `fixed:T`                          | top-p 0.9      | T                                       |
| `edt`            | `edt:theta=θ` (T0 = 1)             | none           | θ                                       |
| `dynatemp`       | `dynatemp:delta=δ` (T = 0.8 ± δ)   | none           | δ                                       |
| `surprise`       | `surprise:tau=τ`                   | none           | τ (bits)                                |
| `pid`            | `pid-positive:target=q`            | none           | target quality q                        |
| `negative_minp`  | `fixed:T`, T < 0                   | min-p 0.1      | T: "the least likely of the plausible"  |
| `hotcold`        | `hotcold:hot=a,n=k,cold=b`         | none           | (T_hot, n, T_cold)                      |
| `table`          | `table:<category>=T,...`           | none           | λ: one table per diversity setting, tuned on validation |
| `*@train`        | `fixed` and `table` again          | the learned policy's | as above: its truncation alone is no skill |

**The bar is each family's convex hull.** A user can mix two settings of a family at random (per
request), so every point inside the hull of its points is reachable without Kelvin; "beats a family"
means lying outside that hull (:mod:`kelvin.evaluation.fronts`).

**The per-category table** is the sceptic's first answer to a category-conditioned policy ("you only
learned the category"): for each λ the learned policy is evaluated at, every category gets the fixed
temperature (of ``evaluation.table_temperatures``) with the highest mean reward at that λ on
``evaluation.table_prompts`` validation prompts of the category (reward = the env's absolute quality
return + λ times its diversity return). Its front is swept by λ, exactly like the learned policy's.

Baselines run under a wide linear action mapping ([-5, 5]: every swept temperature maps to itself), so
no setting is clipped into a different one and every label says what ran.
"""

from __future__ import annotations

from kelvin.config import EvaluationConfig, KelvinConfig
from kelvin.evaluation.policies import EvaluationError, PolicyEntry
from kelvin.tuning import tune_tables  # its home: the base of a residual policy is tuned by it too
from policies.actions import ActionMapping
from policies.registry import make_policy
from samplers.core import Truncation

__all__ = ["BASELINE_MAPPING", "FAMILY_TITLES", "family_entries", "table_entries", "tune_tables", "tuned_fixed_entries"]

BASELINE_MAPPING = ActionMapping(kind="linear", t_min=-5.0, t_max=5.0)
"""The action mapping baselines run under: wide, so every swept temperature is applied as it is."""

NO_TRUNCATION = Truncation()
MIN_P = Truncation(min_p=0.1)
TOP_P = Truncation(top_p=0.9)

FAMILY_TITLES = {
    "fixed": "fixed T", "minp": "min-p 0.1 at T", "topp": "top-p 0.9 at T", "edt": "EDT θ", "dynatemp": "DynaTemp δ",
    "surprise": "surprise τ", "pid": "PID target", "negative_minp": "T < 0 inside min-p 0.1",
    "hotcold": "hot start, cold finish", "table": "per-category table", "fixed@train": "fixed T at the learned truncation",
    "table@train": "per-category table at the learned truncation",
    "fixed-tuned": "best fixed T tuned on validation at λ",
    "fixed-tuned@train": "best fixed T at the learned truncation, tuned on validation at λ",
}


def _g(x: float) -> str:
    return f"{x:g}"


# family -> (the spec of one grid value, its short label, truncation)
_SWEPT = {
    "fixed": (lambda t: f"fixed:{_g(t)}", lambda t: f"T={_g(t)}", NO_TRUNCATION),
    "minp": (lambda t: f"fixed:{_g(t)}", lambda t: f"T={_g(t)}", MIN_P),
    "topp": (lambda t: f"fixed:{_g(t)}", lambda t: f"T={_g(t)}", TOP_P),
    "edt": (lambda v: f"edt:theta={_g(v)}", lambda v: f"θ={_g(v)}", NO_TRUNCATION),
    "dynatemp": (lambda v: f"dynatemp:delta={_g(v)}", lambda v: f"δ={_g(v)}", NO_TRUNCATION),
    "surprise": (lambda v: f"surprise:tau={_g(v)}", lambda v: f"τ={_g(v)}", NO_TRUNCATION),
    "pid": (lambda v: f"pid-positive:target={_g(v)}", lambda v: f"q={_g(v)}", NO_TRUNCATION),
    "negative_minp": (lambda t: f"fixed:{_g(t)}", lambda t: f"T={_g(t)}", MIN_P),
    "hotcold": (lambda v: f"hotcold:hot={_g(v[0])},n={int(v[1])},cold={_g(v[2])}",
                lambda v: f"{_g(v[0])}x{int(v[1])}/{_g(v[2])}", NO_TRUNCATION),
}


def _entry(family: str, spec: str, short: str, truncation: Truncation, config: KelvinConfig) -> PolicyEntry:
    try:
        policy = make_policy(spec, config.env.feature_spec(), BASELINE_MAPPING)
    except ValueError as exc:
        raise EvaluationError(f"evaluation.{family.split('@')[0]} point {spec!r}: {exc}") from exc
    name = f"{family}:{short}"
    label = f"{FAMILY_TITLES[family]}: {short}"
    return PolicyEntry(name, label, family, policy, params={"spec": spec, "point": short}, truncation=truncation)


def family_entries(config: KelvinConfig, train_truncation: Truncation | None = None) -> dict[str, list[PolicyEntry]]:
    """One entry per grid point of every swept family (empty grids leave a family out); with a learned
    policy trained under a truncation, ``fixed@train`` repeats the fixed grid under it."""
    ev: EvaluationConfig = config.evaluation
    out: dict[str, list[PolicyEntry]] = {}
    # greedy and T = 1.0 always (the fronts' reference, the diversity goal's rival) in both fixed families
    fixed = sorted(set(ev.fixed) | {0.0, 1.0}) if ev.fixed else []
    for family, (spec, short, truncation) in _SWEPT.items():
        grid = fixed if family == "fixed" else getattr(ev, family)
        if grid:
            out[family] = [_entry(family, spec(v), short(v), truncation, config) for v in grid]
    if train_truncation is not None and train_truncation.active and fixed:
        spec, short, _ = _SWEPT["fixed"]
        out["fixed@train"] = [_entry("fixed@train", spec(v), short(v), train_truncation, config) for v in fixed]
    return out


def table_entries(tables: dict[float, dict[str, float]], family: str, truncation: Truncation,
                  config: KelvinConfig) -> list[PolicyEntry]:
    """One ``table`` entry per λ (``tables``: λ -> category -> T)."""
    entries = []
    names = config.env.feature_spec().category_slots
    for diversity, tuned in sorted(tables.items()):
        table = {c: tuned.get(c, tuned["other"]) for c in names}  # a category validation did not see: as "other"
        spec = "table:" + ",".join(f"{c}={_g(t)}" for c, t in table.items())
        entry = _entry(family, spec, f"λ={_g(diversity)}", truncation, config)
        entry.params["table"] = dict(table)
        entry.params["lambda"] = float(diversity)
        entry.diversity = float(diversity)  # its reward is scored at its λ (the headline); its tokens ignore λ
        entries.append(entry)
    return entries


def tuned_fixed_entries(tables: dict[float, dict[str, float]], family: str, truncation: Truncation,
                        config: KelvinConfig) -> list[PolicyEntry]:
    """One ``fixed-tuned`` entry per λ: the single temperature with the best validation reward at that λ over all
    prompts (the tables' ``other``), scored at that λ; the headline's fixed-T rival, tuned with the table's runs."""
    entries = []
    for diversity, tuned in sorted(tables.items()):
        t = tuned["other"]
        entry = _entry("fixed", f"fixed:{_g(t)}", f"T={_g(t)}", truncation, config)
        entry.name, entry.family = f"{family}:λ={_g(diversity)}", family
        entry.label = f"{FAMILY_TITLES[family]}: T={_g(t)} at λ={_g(diversity)}"
        entry.params.update(t=float(t), **{"lambda": float(diversity)})
        entry.diversity = float(diversity)
        entries.append(entry)
    return entries
