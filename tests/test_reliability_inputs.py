"""Nothing silently wrong (issue #23): evaluation checks only what it uses, labels that tell the truth, inputs that
used to be silently wrong, what a run says it did, and errors that read. Saves, the writer lock and resumes:
tests/test_reliability.py."""

import json
import os
import subprocess
import sys

import pytest
from conftest import SMOKE, wait_until

from kelvin.rundir import RunDir


# --------------------------------------------------------------------------- evaluation checks only what it uses (B1)
def test_evaluation_config_may_shrink_the_batch_below_the_ppo_minibatch(tmp_path):
    from dataclasses import replace

    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    config = load_config(SMOKE, ["env.batch_size=2"], training=False)  # PPO's minibatch (32) > 8 x 2: not its concern
    rebuilt = replace(config, env=replace(config.env, batch_size=2, group_size=2))  # what evaluate() builds
    assert rebuilt.env.batch_size == 2
    with pytest.raises(ConfigError, match=r"smoke.yaml: ppo.batch_size=32 exceeds the rollout size .* = 16"):
        load_config(SMOKE, ["env.batch_size=2"])  # for training it is
    with pytest.raises(ConfigError, match=r"^ppo.batch_size=32 exceeds the rollout size"):
        rebuilt.check_training()


def test_a_settings_error_raised_inside_the_code_is_one_line(capsys):
    from kelvin.cli import run_cli
    from policies.actions import ActionMapping

    def body():
        ActionMapping(t_min=3.0, t_max=1.0)

    assert run_cli(body) == 2
    assert capsys.readouterr().err == "error: ActionMapping: t_min=3.0 must be below t_max=1.0; set a non-empty " \
                                      "temperature range\n"


@pytest.mark.slow
def test_evaluate_with_one_prompt_runs(tmp_path, capsys):
    from kelvin.evaluation import main

    out = tmp_path / "out"
    code = main(["--config", str(SMOKE), "--policies", "fixed:0.7", "--no-families", "--set", "evaluation.max_prompts=1",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "validation error" not in err, err
    assert json.loads((out / "metrics.json").read_text())["setup"]["n_prompts"] == 1


# --------------------------------------------------------------------------- labels that tell the truth (C)
def test_a_fixed_temperature_outside_its_mapping_is_refused(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.evaluation import EvaluationError, evaluate
    from policies.actions import ActionMapping
    from policies.registry import make_policy

    spec = load_config(SMOKE).env.feature_spec()
    for t, ran in (("-2.0", "-1"), ("9", "2.4"), ("inf", "2.4")):
        with pytest.raises(ValueError) as err:
            make_policy(f"fixed:{t}", spec, ActionMapping())
        assert str(err.value) == (f"FixedTemperature t={float(t):g} is outside its action mapping's range [-1, 2.4] "
                                  f"(it would run at {ran}); choose a T in the range, or widen it (env.action.t_min / "
                                  "env.action.t_max)")
    assert make_policy("fixed:2.4", spec, ActionMapping()).t == 2.4 and make_policy("fixed:-1", spec, None).t == -1
    with pytest.raises(EvaluationError, match=r"--policies item 'fixed:9': FixedTemperature t=9 is outside"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["fixed:9"])
    with pytest.raises(ConfigError, match=r"train.validation_temperatures=\[0.7, 3.0\]: 3 outside env.action's range "):
        load_config(SMOKE, ["train.validation_temperatures=[0.7, 3.0]"])


def test_a_near_miss_of_a_category_is_refused(tmp_path):
    from envs.prompts import load_prompts

    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "Capital of France?", "category": "factual_questoin"}) + "\n")
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    assert str(err.value) == (f"{path}:1: category 'factual_questoin' is not one of the built-in categories (did you "
                              "mean 'factual_question'?); fix the spelling (a name outside creative_writing, "
                              "explanation, code, brainstorming, factual_question, summarisation, math conditions the "
                              "policy as 'other').")
    for near in ("summarization", "Math"):
        path.write_text(json.dumps({"text": "x", "category": near}) + "\n")
        with pytest.raises(ValueError, match=f"category '{near}' is not one of the built-in"):
            load_prompts(path)
    path.write_text(json.dumps({"text": "x", "category": "planning"}) + "\n")  # a name of one's own: "other"
    assert load_prompts(path)[0].category == "planning"


def test_unknown_reset_options_are_refused():
    from stub_lm import NO_EMBEDDER, STUB_PROMPTS, SYMMETRIC, StubLM

    from envs.generation import TemperatureEnv

    env = TemperatureEnv(lm=StubLM(), max_new_tokens=3, reward=NO_EMBEDDER, action=SYMMETRIC, prompts=STUB_PROMPTS,
                         token_prior=False)
    with pytest.raises(ValueError) as err:
        env.reset(options={"promt": "Name a colour."})
    assert str(err.value) == ("reset(options=...): unknown option 'promt'; did you mean 'prompt'? (valid: prompt, "
                              "category, diversity)")
    _, info = env.reset(options={"prompt": "Name a colour.", "category": "explanation"})
    assert (info["prompt"], info["category"]) == ("Name a colour.", "explanation")


def test_a_key_given_twice_in_a_config_is_refused(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    path = tmp_path / "twice.yaml"
    path.write_text("env:\n  batch_size: 4\n  group_size: 2\n  batch_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: key 'batch_size' is given twice, at line 2 and line 4; keep one (YAML would "
                              "silently use the last)")
    path.write_text("env:\n  batch_size: 4\nppo:\n  n_steps: 8\nenv:\n  group_size: 2\n")
    with pytest.raises(ConfigError, match="key 'env' is given twice, at line 1 and line 5"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set 'env.action=\{t_min: -1.0, t_min: 0.0\}': key 't_min' is given "
                                          "twice, at line 1 and line 1"):
        load_config(None, ["env.action={t_min: -1.0, t_min: 0.0}"])
    from kelvin.config_loading import _yaml_load

    merged = _yaml_load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")  # a merge key, then an override: still YAML's
    assert merged == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_booleans_and_complex_numbers_are_not_numbers_to_the_samplers():
    import torch

    from samplers.core import apply_temperature, sample
    from samplers.runtime import check_diversity

    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    with pytest.raises(TypeError, match=r"^temperature must hold real numbers; got a tensor of dtype torch.bool"):
        sample(logits, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="temperature must be a real number"):
        sample(logits, True)
    with pytest.raises(TypeError, match=r"^logits must hold real numbers; got a tensor of dtype torch.bool"):
        sample(logits > 2, 1.0)
    with pytest.raises(TypeError, match=r"^logits must hold real numbers; got a tensor of dtype torch.complex64: pass "
                                        "the model's real-valued scores, e.g. logits.float\\(\\)"):
        apply_temperature(logits.to(torch.complex64), 1.0)
    with pytest.raises(ValueError, match=r"^diversity=True must be a finite number >= 0"):
        check_diversity(True, None, (0.0, 2.0))
    assert check_diversity(1, None, (0.0, 2.0)) == 1.0


# --------------------------------------------------------------------------- what a run says it did (C)
def _summary(**fields) -> dict:
    base = {"run_dir": "runs/x", "timesteps": 0, "resumed_finished": False, "completed": False, "saved": False,
            "updates": 0, "interrupted": True, "signal": "SIGTERM", "discarded_steps": 0, "wall_s": 1.0,
            "validation": None, "export": None, "exit_code": 143}
    return {**base, **fields}


def test_the_report_of_a_run_says_what_was_saved(capsys):
    from kelvin.config_loading import load_config
    from kelvin.training import _report

    config = load_config(SMOKE)
    assert _report(_summary(), config) == 143
    assert capsys.readouterr().out == ("interrupted (nothing saved): SIGTERM before the first PPO update of this "
                                       "session completed; continue with --resume runs/x\n")
    assert _report(_summary(timesteps=64, saved=True, updates=2, discarded_steps=5), config) == 143
    assert capsys.readouterr().out.startswith("interrupted (model saved): SIGTERM at step 69; saved the model of "
                                              "step 64 (2 PPO updates)")
    finished = _summary(timesteps=96, resumed_finished=True, completed=True, interrupted=False)
    for summary in (finished, {k: v for k, v in finished.items() if k != "resumed_finished"} | {"finished": True}):
        assert _report(summary, config) == 0  # "finished": the field's name in earlier releases
        assert capsys.readouterr().out.startswith("runs/x is finished: 96 steps")


@pytest.mark.slow
def test_sigterm_while_starting_saves_nothing_and_says_so(tmp_path):
    import signal

    from conftest import ROOT

    run_dir = tmp_path / "early"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(SMOKE), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until((run_dir / "train.lock").exists, proc)  # the lock: the signal handlers are in place
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert out == (f"interrupted (nothing saved): SIGTERM before the first PPO update of this session completed; "
                   f"continue with --resume {run_dir}\n")
    assert not (run_dir / "model.zip").exists() and not (run_dir / "train.lock").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["saved"], summary["completed"], summary["resumed_finished"]) == (False, False, False)
    assert "finished" not in summary


@pytest.mark.slow
def test_a_completed_run_says_so_in_its_summary(smoke_run):
    summary = json.loads((smoke_run.run_dir / "summary.json").read_text())
    assert (summary["completed"], summary["saved"], summary["resumed_finished"]) == (True, True, False)


# --------------------------------------------------------------------------- errors that read (B)
def test_a_device_torch_does_not_know_is_refused_at_load(tmp_path, capsys):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.training import main

    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["train.policy_device=banana"])
    assert str(err.value) == (f"{SMOKE}: train: policy_device='banana' is not a device torch knows; use auto, cpu, "
                              "cuda, cuda:N or mps")
    with pytest.raises(ConfigError, match="model: device='cuda:x' is not a device torch knows"):
        load_config(SMOKE, ["model.device=cuda:x"])
    assert load_config(SMOKE, ["train.policy_device=cuda:1", "model.device=auto"]).train.policy_device == "cuda:1"
    assert main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--set", "train.policy_device=banana"]) == 2
    assert "policy_device='banana'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the corrected rerun is not refused


def test_ctrl_c_while_the_entry_point_imports_is_one_line(tmp_path, monkeypatch, capsys):
    from kelvin.cli import run_main

    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_main("slow_to_import") == 130
    assert capsys.readouterr().err == "interrupted (SIGINT)\n"


def test_a_seed_out_of_range_names_the_flag(capsys):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.evaluation import main

    with pytest.raises(SystemExit) as exit_:
        main(["--seed", str(10**23), "--policies", "pid"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --seed: '100000000000000000000000' is not a seed: give an integer in [0, 4294967295]")
    with pytest.raises(ConfigError, match=r"train.seed=100000000000000000000000: must be an integer in \[0, 4294967295\]"):
        load_config(SMOKE, [f"train.seed={10**23}"])


def test_the_event_writer_thread_traceback_is_not_printed(monkeypatch):
    import threading

    from kelvin.training import _event_writer_errors_in_main_thread

    printed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(str(args.exc_value)))

    class _AsyncWriterThread(threading.Thread):  # TensorBoard's writer thread, by name
        def run(self):
            raise OSError(30, "Read-only file system")  # raised again in the training thread at its next write

    class Other(threading.Thread):
        def run(self):
            raise RuntimeError("any other thread's error")

    with _event_writer_errors_in_main_thread():
        for thread in (_AsyncWriterThread(), Other()):
            thread.start()
            thread.join()
    assert printed == ["any other thread's error"]


@pytest.fixture
def read_only_able(tmp_path):
    """A tmpfs that the test may remount read-only (root in a container that allows mounts), else skip."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "none", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and mount to turn a file system read-only")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_file_system_turning_read_only_is_one_true_line(read_only_able):
    from test_faults import _popen_train, _wait_for_first_checkpoint

    run_dir = read_only_able / "run"
    proc = _popen_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.total_timesteps=100000",
                         "--set", "train.validate_every=0"])
    _wait_for_first_checkpoint(run_dir, proc)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_able)], check=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    progress = ("Loading weights", "tuned base (", "validation baselines (", "prompt cache: ")  # start-up lines, before the failure
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: cannot write {run_dir}/") and "the file system is read-only" in lines[0]
    point = RunDir(run_dir).resume_point(normalized=True)
    assert point is not None and f"the newest model that loads is {point.model_file} (step {point.step})" in lines[0]
