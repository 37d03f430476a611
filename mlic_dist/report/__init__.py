"""The paper's tables and plots for an experiment's runs and ensembles: tables.py (Markdown and
CSV, the report run), plots.py (PNG), __main__.py (`python -m mlic_dist.report`)."""
