"""Data files shipped with the package: the default prompt/reference set (``sgpo_default.jsonl``, loaded by
:func:`~trl_sgpo.data.checks.load_default_dataset`) and SSO's principles (``sso_principles.jsonl``, loaded by
:func:`~trl_sgpo.trainers.sso_principles.load_principles`)."""
