"""The names under which a run is recorded, where one module writes and another reads."""

# The run-level figure that model selection reads: validation accuracy of the kept epoch.
BEST_VAL_METRIC = "val/best_accuracy"
# The test split's scores, once, after training. Not `test/...`: the UI groups a run's charts
# by what comes before the slash and shows the groups alphabetically, so a `test` group of
# one-point charts would come before the `train` and `val` curves; these go last instead.
TEST_PREFIX = "test_"
TEST_ACCURACY_METRIC = "test_accuracy"
# The run's model (a LoggedModel), the kept epoch's; and each epoch's, named and tagged with it.
MODEL_NAME = "model"
EPOCH_TAG = "epoch"
# Why a run failed or was stopped, in a line.
ERROR_TAG = "error"
# Where the run keeps its training state on this machine, and who is running it.
CHECKPOINT_TAG = "checkpoint"
PROCESS_TAG = "process"
# torchrun's id for the launch that trains the run: its restarts (--max-restarts) find it by it.
LAUNCH_TAG = "torchrun_launch"
# The run's last checkpoint among its artifacts, for resuming on another machine.
CHECKPOINT_ARTIFACT_DIR = "checkpoint"
# The UI nests a run under the one this tag names (a sweep's trials, a training's repeats).
PARENT_TAG = "mlflow.parentRunId"
# MLflow's UI opens an experiment in its GenAI mode unless told it is for model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
