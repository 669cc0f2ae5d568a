"""Evaluation of frozen encoders: features, kNN, fast probe, per-task scores, the lincls protocol.

`extract_features` -> `knn_predict` / `feature_probe` -> `per_task_accuracy` is the cheap
measurement the trainer runs after every task (`evaluate_encoder` chains them); `linear_eval` is
the paper's 100-epoch augmented linear protocol behind `cclnb lincls` (the headline number).
"""

from cclnb.evaluate.encoder import evaluate_encoder, overall_accuracy, per_task_accuracy
from cclnb.evaluate.features import calibrate_batchnorm, extract_features
from cclnb.evaluate.knn import knn_predict
from cclnb.evaluate.lincls import linear_eval, probe_eval
from cclnb.evaluate.per_task import eval_inputs, task_evaluator
from cclnb.evaluate.probe import feature_probe

__all__ = ["calibrate_batchnorm", "eval_inputs", "evaluate_encoder", "extract_features", "feature_probe", "knn_predict", "probe_eval",
           "linear_eval", "overall_accuracy", "per_task_accuracy", "task_evaluator"]
