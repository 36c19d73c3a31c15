"""scripts/headroom_probe.py: the hand-made change of the base it measures, on hand-computed rows (fast)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kelvin.config_loading import load_config
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec
from policies.tuned_base import TunedBase, TunedBasePolicy

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "headroom_probe.py"
_spec = importlib.util.spec_from_file_location("headroom_probe", _PATH)
headroom_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headroom_probe)


def test_the_shapes_boost_the_first_tokens_at_lambda_one_and_up_and_cool_lambda_zero():
    position = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 5.0, 0.0])
    diversity = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.0])
    hot2 = headroom_probe.shaped_offset(position < 2, diversity, headroom_probe.SHAPES["hot2"])
    hot4 = headroom_probe.shaped_offset(position < 4, diversity, headroom_probe.SHAPES["hot4"])
    torch.testing.assert_close(hot2, torch.tensor([0.25, 0.25, 0.0, 0.0, 0.0, 0.25, 0.0, -0.1]))
    torch.testing.assert_close(hot4, torch.tensor([0.5, 0.5, 0.5, 0.5, -0.1, 0.5, -0.1, -0.1]))


def test_a_shaped_base_adds_the_offset_to_the_base_at_each_position_and_lambda():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)  # T = 1.2 (action + 1)
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 1.2)}), spec, mapping)
    obs = torch.zeros(4, spec.dim)
    obs[:, spec.index("position")] = torch.tensor([0.0, 1.0, 2.0, 0.0]) / 8  # tokens 0, 1, 2, 0 of 8
    obs[:, spec.index("diversity")] = torch.tensor([2.0, 2.0, 2.0, 0.0])
    shaped = headroom_probe.ShapedBase(base, headroom_probe.SHAPES["hot2"])
    # base actions: λ = 2 -> T 1.2 -> action 0; λ = 0 -> T 0.6 -> action -0.5, then -0.1 everywhere
    torch.testing.assert_close(shaped.actions(obs), torch.tensor([0.25, 0.25, 0.0, -0.6]))
    torch.testing.assert_close(shaped.temperatures(obs), torch.tensor([1.5, 1.5, 1.2, 0.48]))


def test_a_spliced_policy_takes_the_first_policy_on_the_first_tokens_and_the_second_after(capsys):
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)  # T = 1.2 (action + 1)
    hot = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (1.2, 1.8)}), spec, mapping)
    cool = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 1.2)}), spec, mapping)
    obs = torch.zeros(5, spec.dim)
    obs[:, spec.index("position")] = torch.tensor([0.0, 3.0, 4.0, 7.0, 1.0]) / 8  # tokens 0, 3, 4, 7, 1 of 8
    obs[:, spec.index("diversity")] = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0])
    spliced = headroom_probe.Spliced(hot, cool, 4)
    # tokens 0-3: hot (λ = 2 T 1.8 -> action 0.5; λ = 0 T 1.2 -> 0); tokens 4 on: cool (λ = 2 T 1.2 -> action 0)
    torch.testing.assert_close(spliced.actions(obs), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))
    other = FeatureSpec.of(FeatureSettings(include_diversity=True), 16, ())
    with pytest.raises(ValueError, match="read different observations"):
        headroom_probe.Spliced(TunedBasePolicy(cool.base, other, mapping), cool, 4)
    with pytest.raises(SystemExit):  # refused before the run directory is read
        headroom_probe.main(["runs/not-there", "--splice", "0"])
    assert "--splice takes the first tokens to splice, >= 1; got 0" in capsys.readouterr().err


def test_a_category_shape_changes_only_its_categories_rows_at_lambda_one_and_up():
    """``4:0.5:0:open`` raises the first tokens of the open prompts' rows only; an answerable row keeps its base
    at λ >= 1 and every row gets the λ = 0 offset; an unknown category is refused."""
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ("creative_writing", "math"))
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 1.2)}), spec, mapping)
    obs = torch.zeros(4, spec.dim)
    obs[:, spec.index("diversity")] = torch.tensor([2.0, 2.0, 2.0, 0.0])
    for row, slot in enumerate(["creative_writing", "math", "other", "math"]):
        obs[row, spec.index(f"category_{slot}")] = 1.0
    shaped = headroom_probe.ShapedBase(base, headroom_probe.parse_shapes("4:0.5:0:open")["4:0.5:0:open"])
    # open = every slot but math and factual_question: creative_writing and other get +0.5; math keeps action 0
    torch.testing.assert_close(shaped.actions(obs), torch.tensor([0.5, 0.0, 0.5, -0.6]))
    with pytest.raises(ValueError, match=r"categories \['poetry'\] are not the run's"):
        headroom_probe.ShapedBase(base, (4, 0.5, 0.0, ("poetry",)))
    blind = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())  # a run without the category
    blind_base = TunedBasePolicy(base.base, blind, mapping)
    with pytest.raises(ValueError, match=r"categories \['open'\] given, but the run's observations carry no"):
        headroom_probe.ShapedBase(blind_base, (4, 0.5, 0.0, ("open",)))  # it would apply to every row


def test_a_feature_shape_changes_the_rows_where_its_test_holds():
    """``max_prob<0.3:0.5:-0.25`` adds +0.5 where the top token is under 0.3, -0.25 elsewhere (λ >= 1 only); an
    unknown feature or a malformed condition is refused with the grammar."""
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 1.2)}), spec, mapping)
    shapes = headroom_probe.parse_shapes("max_prob<0.3:0.5:-0.25,entropy>2:0.1:0")
    assert shapes == {"max_prob<0.3:0.5:-0.25": (("max_prob", "<", 0.3), 0.5, -0.25, ()),
                      "entropy>2:0.1:0": (("entropy", ">", 2.0), 0.1, 0.0, ())}
    obs = torch.zeros(4, spec.dim)
    obs[:, spec.index("max_prob")] = torch.tensor([0.1, 0.3, 0.9, 0.1])
    obs[:, spec.index("diversity")] = torch.tensor([2.0, 2.0, 2.0, 0.0])
    shaped = headroom_probe.ShapedBase(base, shapes["max_prob<0.3:0.5:-0.25"])
    # λ = 2 base action 0: +0.5 at max_prob 0.1, -0.25 at 0.3 (not below) and 0.9; λ = 0: -0.5 - 0.1
    torch.testing.assert_close(shaped.actions(obs), torch.tensor([0.5, -0.25, -0.25, -0.6]))
    with pytest.raises(ValueError, match="no feature named 'max_porb'"):
        headroom_probe.ShapedBase(base, (("max_porb", "<", 0.3), 0.5, 0.0, ()))
    with pytest.raises(ValueError, match="WHERE:BOOST:AFTER.*got '<0.3:0.5:0'"):
        headroom_probe.parse_shapes("<0.3:0.5:0")


def _saved(run, base, learned):
    return {"run": run, "reward": {"0": {"base": base, "learned": learned}}}


def test_pooling_averages_each_runs_difference_from_its_own_base_prompt_by_prompt(tmp_path, capsys):
    one = _saved("s0", {"a": 1.0, "b": 2.0, "c": 0.0}, {"a": 1.5, "b": 2.0, "c": 1.0})  # +0.5, 0, +1
    two = _saved("s1", {"a": 3.0, "b": 0.0, "c": 1.0}, {"a": 3.5, "b": 1.0, "c": 1.0})  # +0.5, +1, 0
    pooled = headroom_probe.pooled_differences([one, two])
    np.testing.assert_array_equal(pooled["0"]["learned"], [0.5, 0.5, 0.5])
    paths = []
    for saved in (one, two):
        paths.append(tmp_path / f"{saved['run']}.json")
        paths[-1].write_text(json.dumps(saved))
    assert headroom_probe.main(["--pool", *map(str, paths)]) == 0
    # every prompt's pooled difference is +0.5, so is every resample's mean
    assert "λ=0 | learned − base +0.500 [+0.500, +0.500]" in capsys.readouterr().out
    other = _saved("s2", {"a": 1.0, "d": 2.0, "c": 0.0}, {"a": 1.0, "d": 2.0, "c": 0.0})
    with pytest.raises(ValueError, match="s2: its prompts at λ=0 differ from s0's"):
        headroom_probe.pooled_differences([one, other])


def test_pooling_against_an_earlier_probe_measures_later_minus_earlier_learned(tmp_path, capsys):
    base = {"a": 1.0, "b": 2.0}
    later = [_saved("long-s0", base, {"a": 2.0, "b": 2.5}), _saved("long-s1", base, {"a": 1.0, "b": 3.0})]
    earlier = [_saved("s0", base, {"a": 1.5, "b": 2.5}), _saved("s1", base, {"a": 1.0, "b": 2.0})]
    paths = {}
    for saved in later + earlier:
        paths[saved["run"]] = tmp_path / f"{saved['run']}.json"
        paths[saved["run"]].write_text(json.dumps(saved))
    # later − earlier: s0 +0.5, 0; s1 0, +1; pooled per prompt +0.25, +0.5 (not the +0.5, +0.5 against the base)
    pooled = headroom_probe.pooled_differences([headroom_probe.against_earlier(a, b) for a, b in zip(later, earlier)])
    np.testing.assert_array_equal(pooled["0"]["learned"], [0.25, 0.5])
    argv = ["--pool", str(paths["long-s0"]), str(paths["long-s1"]), "--against", str(paths["s0"]), str(paths["s1"])]
    assert headroom_probe.main(argv) == 0
    out = capsys.readouterr().out
    assert "base replaced by the learned policy of: s0, s1" in out and "λ=0 | learned − earlier +0.375" in out
    # each run's own mean (s0 +0.25, s1 +0.5) and their spread: SD (ddof 1) = 0.25 / √2 = 0.177
    assert "  learned by run: +0.250 / +0.500 (between runs, SD 0.177)" in out
    assert headroom_probe.main(argv[:-1]) == 2  # one file short
    assert "--against takes one file per --pool file (2); got 1" in capsys.readouterr().err
    other_base = _saved("s9", {"a": 1.0, "b": 2.5}, {"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="long-s0 and s9 differ in their base's rewards at λ=0"):
        headroom_probe.against_earlier(later[0], other_base)
    with pytest.raises(SystemExit):
        headroom_probe.main(["--against", str(paths["s0"])])


def test_pooling_keeps_the_lambdas_and_shapes_every_run_probed(tmp_path, capsys):
    one = _saved("s0", {"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.0})  # +0.5, 0
    one["reward"]["0"]["hot4"] = {"a": 0.0, "b": 2.0}  # a shape only s0 probed
    one["reward"]["2"] = {"base": {"a": 0.0, "b": 0.0}, "learned": {"a": 1.0, "b": 1.0}}  # a λ only s0 probed
    two = _saved("s1", {"a": 3.0, "b": 0.0}, {"a": 3.5, "b": 1.0})  # +0.5, +1
    pooled = headroom_probe.pooled_differences([one, two])
    assert list(pooled) == ["0"] and list(pooled["0"]) == ["learned"]
    np.testing.assert_array_equal(pooled["0"]["learned"], [0.5, 0.5])
    paths = [tmp_path / "s0.json", tmp_path / "s1.json"]
    for path, saved in zip(paths, (one, two)):
        path.write_text(json.dumps(saved))
    assert headroom_probe.main(["--pool", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "λ=2 left out: not probed in s1" in out and "λ=0 | learned − base +0.500" in out and "hot4" not in out
    apart = _saved("s2", {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})
    apart["reward"] = {"1": apart["reward"]["0"]}  # probed at λ = 1 only: nothing in common with s0
    (tmp_path / "s2.json").write_text(json.dumps(apart))
    assert headroom_probe.main(["--pool", str(paths[0]), str(tmp_path / "s2.json")]) == 2
    assert "no λ with a policy that every run probed" in capsys.readouterr().err


def test_shapes_are_names_or_where_boost_after():

    assert headroom_probe.parse_shapes("hot4, 4:0.1:0,,2:0.25:-0.05,4:0.5:0:open,1:0.2:0:math+code") == {
        "hot4": (4, 0.5, -0.1, ()), "4:0.1:0": (4, 0.1, 0.0, ()), "2:0.25:-0.05": (2, 0.25, -0.05, ()),
        "4:0.5:0:open": (4, 0.5, 0.0, ("open",)), "1:0.2:0:math+code": (1, 0.2, 0.0, ("math", "code"))}
    assert headroom_probe.parse_shapes("") == {}
    for bad in ("hot3", "4:0.1", "0:0.1:0", "x:0.1:0", "4:0.1:0:", "4:0.1:0:a:b", "max_prob<x:0.1:0",
                "max_prob<nan:0.1:0"):
        with pytest.raises(ValueError, match=r"WHERE:BOOST:AFTER.*got '" + bad):
            headroom_probe.parse_shapes(bad)


def test_bad_lambdas_and_seeds_are_refused_before_any_model_loads(tmp_path, capsys):

    load_config(None, ["env.diversity_values=[0.0,2.0]"]).dump(tmp_path / "config.yaml")
    for bad, says in (("2.5", "every λ must lie in the run's range [0, 2]"), ("1,x", "comma-separated numbers")):
        with pytest.raises(SystemExit):
            headroom_probe.main([str(tmp_path), "--lambdas", bad])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        headroom_probe.main([str(tmp_path), "--seeds", "0"])
    assert "--seeds must be >= 1 and --first-seed >= 0; got 0 and 0" in capsys.readouterr().err


@pytest.mark.slow
def test_seeds_run_in_two_parts_pool_to_the_figures_of_one_run(smoke_run, tmp_path):
    """--first-seed 1 --seeds 1 pooled with --seeds 1 gives, prompt by prompt, what --seeds 2 gives: the streams
    are the validation seeds, each λ on its own seeded env (so --lambdas picks a λ without changing its figures)."""
    run = str(smoke_run.run_dir)
    common = [run, "--prompts", "2", "--shapes", "2:0.3:0", "--learned", "--lambdas", "2"]
    for name, extra in (("both", ["--seeds", "2"]), ("first", ["--seeds", "1"]),
                        ("second", ["--seeds", "1", "--first-seed", "1"])):
        assert headroom_probe.main([*common, *extra, "--save", str(tmp_path / f"{name}.json")]) == 0
    saved = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("both", "first", "second")}
    assert list(saved["both"]["reward"]) == ["2"] and saved["second"]["first_seed"] == 1
    whole = headroom_probe.pooled_differences([saved["both"]])
    parts = headroom_probe.pooled_differences([saved["first"], saved["second"]])
    for name in ("2:0.3:0", "learned"):
        np.testing.assert_allclose(parts["2"][name], whole["2"][name], rtol=0, atol=1e-9)
    assert saved["first"]["reward"]["2"]["base"] != saved["second"]["reward"]["2"]["base"]  # two different streams


def test_pooling_against_a_reference_policy_measures_each_policy_minus_it(tmp_path, capsys):
    one = _saved("s0", {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0})
    one["reward"]["0"]["4:0:-0.1"] = {"a": 1.5, "b": 1.0}  # the shape the residual started at
    two = _saved("s1", {"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 3.0})
    two["reward"]["0"]["4:0:-0.1"] = {"a": 1.0, "b": 2.0}
    # learned − the shape: s0 +0.5, +1; s1 0, +1; pooled per prompt +0.25, +1
    pooled = headroom_probe.pooled_differences([headroom_probe.rebased(s, "4:0:-0.1") for s in (one, two)])
    assert list(pooled["0"]) == ["learned"]
    np.testing.assert_array_equal(pooled["0"]["learned"], [0.25, 1.0])
    paths = [tmp_path / "s0.json", tmp_path / "s1.json"]
    for path, saved in zip(paths, (one, two)):
        path.write_text(json.dumps(saved))
    assert headroom_probe.main(["--pool", *map(str, paths), "--reference", "4:0:-0.1"]) == 0
    assert "λ=0 | learned − 4:0:-0.1 +0.625" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a policy the probes did not run
        headroom_probe.main(["--pool", *map(str, paths), "--reference", "hot4"])
    assert "s0 did not probe 'hot4'; give a policy it probed (base, learned, 4:0:-0.1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # both replace the base
        headroom_probe.main(["--pool", str(paths[0]), "--against", str(paths[1]), "--reference", "4:0:-0.1"])
