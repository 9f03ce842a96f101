"""Result tables and plots built from tracked runs (the MLflow store) or from the per-run JSON files of `dvc repro`.

    python -m analysis.tables --uri sqlite:///$PWD/mlflow.db --experiment flatquant --out results/tables
    python -m analysis.tables --from-json results/runs --out results/tables     # what the DVC `tables` stage runs
    python -m analysis.plots --uri sqlite:///$PWD/mlflow.db --experiment flatquant --out results/plots

Nothing here is imported by flatquant/ or pipeline/, except that a stage may call a plot function and log the
path it returns.
"""
