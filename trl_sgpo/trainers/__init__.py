"""Trainers, each beside its config: SGPO, SPPO and SSO (its principles in ``sso_principles``, its loss in
``sso_loss``; SPPO's in ``sppo_loss``) on the on-policy base (``onpolicy``; answers sampled during training, with
transformers or vLLM, in ``generation``), and improver SFT."""
