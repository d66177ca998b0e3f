"""Evaluation of policies against a gold reward (docs/monitor.md).

- :mod:`aligner.evaluation.overoptimization`: pure functions — the functional forms of
  gold reward against d = sqrt(KL) and their least-squares fits, the KL estimate from
  sampled sequences, reward-model ensembles, the best-of-n estimator.
- :mod:`aligner.evaluation.sampling`: n responses per prompt from a policy with the
  rollout engine, scored by reward sources (``aligner rm bon``, ``aligner data pairs``).
- :mod:`aligner.evaluation.monitor`: the gold-vs-proxy monitor, a training-loop hook the
  trainers attach (``monitor.enabled``).
"""
