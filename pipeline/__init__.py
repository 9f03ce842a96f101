"""The pipeline: stages that read a composed config, call the core package and log to MLflow."""
