"""Sweeps: one Optuna study searches training options, each trial a child MLflow run of one
parent run per study. A file per job:

    study.py       the study: checked options, its storage, sampler and pruner, its budget,
                   the plan every worker follows, and the outcome
    workers.py     trials trained by workers, in processes of their own on this machine, and
                   the best registered once the study ends
    parent_run.py  the parent run's view of the study: settings, the best so far, the table
                   of trials and Optuna's plots; the tags that nest each trial under it
"""
