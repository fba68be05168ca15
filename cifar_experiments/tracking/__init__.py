"""Everything this project says to MLflow's tracking store, a file per job:

keys.py         the names of what a run records, shared by writer and reader
store.py        reaching the store, logins and permissions, experiments, retries
outage.py       telling a tracking server that stopped answering from other errors
recorder.py     `MlflowTracker`: a training run's record, behind `callbacks.Tracker`
lifecycle.py    a run started, or taken over, and always ended with the status it earned
links.py        addresses of a run's or a model version's page in the MLflow UI
past_runs.py    what resuming needs of an earlier run, and its checkpoint
project_run.py  the run `mlflow run` made for us, asked for once
"""
