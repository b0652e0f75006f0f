"""The numerics version: the one part of a stored result's key that stands for the code's behaviour.

A run's numbers are determined by the model's weights, the recipe, the protocol (sizes, seed, sampler, CFG scale,
sample count, feature network, reference batch) — each of them part of the run's key
(:func:`hqdit_utils.runs.experiments.run`) — and by what the code *does*. The code enters the key as one declared
integer, :data:`NUMERICS_VERSION`, not as its text: a refactor that keeps behaviour (a rename, a moved function, a
new subpackage, a docstring) keeps every stored run valid, the ~135 runs the book ships in ``data/book-runs/``
included.

The rule (ours, for this project):

* A change that is **meant** to change what a calibration, ``quantize_``, sampling or evaluation computes — a new
  rounding rule, another clipping grid, another kernel formula, another sampler default — bumps
  :data:`NUMERICS_VERSION` and regenerates the golden outputs (``make golden``) in the same commit; every stored
  run then has a stale key and is recomputed (the shipped store is refreshed with ``make book-results`` after a
  cold build).
* A change **not** meant to change numbers keeps the version. The golden check (:mod:`hqdit_utils.runs.golden`,
  ``tests/test_golden.py``) recomputes shortened runs of every registered recipe and compares them with
  ``data/golden/``: an undeclared behaviour change fails that test instead of silently reusing stale results.

History: 1 — the behaviour of the code that made the store of 2026-12-04 (previously keyed by the syntax trees of
the modules on a run's import path, fingerprint ``490b9930edd07a40``).
"""

#: Bumped (by hand, in the commit that makes the change) whenever the numbers a run computes are meant to change.
NUMERICS_VERSION = 1
