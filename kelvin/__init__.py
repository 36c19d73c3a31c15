"""Kelvin orchestration (the layer that may import everything): run configs (:mod:`kelvin.config`, read by
:mod:`kelvin.config_loading`), run directories (:mod:`kelvin.rundir`) and the atomic writes under them
(:mod:`kelvin.atomic`), PPO training (:mod:`kelvin.training`), rollouts shared by training and evaluation
(:mod:`kelvin.rollout`), export of runs and baselines (:mod:`kelvin.export`), the evaluation package
(:mod:`kelvin.evaluation`) and the anomalous-token discovery command line (:mod:`kelvin.discovery`)."""
