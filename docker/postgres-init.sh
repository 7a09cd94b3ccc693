#!/bin/bash
# Runs once, when the PostgreSQL volume is created: one database for MLflow, one for Optuna.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<-SQL
	CREATE DATABASE "$POSTGRES_MLFLOW_DB";
	CREATE DATABASE "$POSTGRES_OPTUNA_DB";
SQL
