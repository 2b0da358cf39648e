"""The job runner behind ``python -m callbacks``: recipe jobs, the failure gallery, checkpoint audits, the CLI.

:mod:`~callbacks.runner.job` builds and runs the training job a recipe describes, :mod:`~callbacks.runner.gallery`
holds the models and faults the gallery recipes name, :mod:`~callbacks.runner.audit` runs the checks on a
checkpoint folder offline, and :mod:`~callbacks.runner.cli` is the command line. The library (the monitor, the
checks, the trainer integrations) never imports this package.
"""
