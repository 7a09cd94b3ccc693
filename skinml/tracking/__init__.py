"""The seam to MLflow's tracking API, as Lightning's loggers are: the run writer, the run
reader, the logged pyfunc model (with its request coalescer), and retries of racing
creates. No other layer but the registry and serving imports MLflow."""
