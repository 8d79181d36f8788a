"""Declarative studies (YAML), the ``ckapipe`` command line, and cluster jobs."""
