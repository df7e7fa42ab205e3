"""MLflow tracking, plots and the summary report. Imports ``formats``, ``compress`` and ``core``."""
