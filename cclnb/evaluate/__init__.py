"""Evaluation of frozen encoders: features, kNN, fast probe, per-task scores, the lincls protocol.

`extract_features` -> `knn_predict` / `feature_probe` -> `per_task_accuracy` is the cheap
measurement the trainer runs after every task (`evaluate_encoder` chains them); `linear_eval` is
the paper's 100-epoch augmented linear protocol behind `cclnb lincls` (the headline number);
`task_evaluator` binds the per-task measurement to a run (the training stage calls it back);
`metrics` turns an accuracy matrix into average accuracy and forgetting. May import the shared
basics, the data and training stages (models, checkpoints, run directories); never the study.
"""

from cclnb.evaluate.encoder import evaluate_encoder, overall_accuracy, per_task_accuracy
from cclnb.evaluate.features import calibrate_batchnorm, extract_features
from cclnb.evaluate.knn import knn_predict
from cclnb.evaluate.lincls import linear_eval, probe_eval
from cclnb.evaluate.per_task import eval_inputs, task_evaluator
from cclnb.evaluate.probe import feature_probe

__all__ = ["calibrate_batchnorm", "eval_inputs", "evaluate_encoder", "extract_features", "feature_probe",
           "knn_predict", "linear_eval", "overall_accuracy", "per_task_accuracy", "probe_eval", "task_evaluator"]
