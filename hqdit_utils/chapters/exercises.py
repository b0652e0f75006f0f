"""Checks for the book's exercises: silent while unanswered, loud when wrong.

Every exercise in a chapter has three parts (the convention ``tests/test_exercises.py`` relies on):

1. an answer cell tagged ``exercise-answer`` whose first line is ``# exercise: <label>`` and which
   binds ``answer = ...`` (``...`` — Python's ``Ellipsis`` — means "not answered yet");
2. a check cell tagged ``exercise-check`` (usually also ``remove-input``) that calls :func:`check` or
   :func:`check_function` with the ``expected`` value computed in the chapter's own cells;
3. a ``{solution-start} <label>`` … ``{solution-end}`` block (class ``dropdown``) holding one fenced
   ``python`` code block that, put in place of the answer cell, makes the check pass.

The book is built with the answer cells blank, so a check only reports "not answered yet"; the test
suite fills in each solution (the check must pass) and a wrong answer (the check must fail).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..engine.recipes import changed_ingredients, get_recipe
from .tables import paired_interval

NOT_ANSWERED = Ellipsis


class WrongAnswer(AssertionError):
    """Raised by a check whose answer is wrong; the message says what was expected."""


def _as_float(x) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise WrongAnswer(f"expected one number, got a tensor of shape {tuple(x.shape)}")
        return float(x)
    return float(x)


def check(label: str, answer, expected, *, rtol: float = 1e-3, atol: float = 0.0) -> bool:
    """Compare ``answer`` with ``expected``; returns True when correct, False when unanswered.

    Numbers (and 1-element tensors) match within ``rtol``/``atol``; tensors and sequences of numbers
    element-wise within the same tolerances; strings case-insensitively after stripping; anything else
    by ``==``. Raises :class:`WrongAnswer` otherwise.
    """
    if answer is NOT_ANSWERED:
        print(f"Exercise {label}: not answered yet — replace `...` in the answer cell and rerun.")
        return False
    if isinstance(expected, str):
        ok = isinstance(answer, str) and answer.strip().lower() == expected.strip().lower()
        if not ok:
            raise WrongAnswer(f"Exercise {label}: {answer!r} is not the answer — look again.")
    elif isinstance(expected, torch.Tensor) and expected.numel() > 1:
        got = torch.as_tensor(answer, dtype=torch.float64)
        want = expected.detach().to(torch.float64)
        if got.shape != want.shape:
            raise WrongAnswer(f"Exercise {label}: shape {tuple(got.shape)}, expected {tuple(want.shape)}.")
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            worst = float((got - want).abs().max())
            raise WrongAnswer(f"Exercise {label}: largest difference from the expected tensor is {worst:.3g}.")
    elif isinstance(expected, (int, float)) or (isinstance(expected, torch.Tensor) and expected.numel() == 1):
        if isinstance(answer, (str, bytes)) or answer is None:
            raise WrongAnswer(f"Exercise {label}: expected a number, got {answer!r}.")
        got, want = _as_float(answer), _as_float(expected)
        if not (math.isfinite(got) and math.isclose(got, want, rel_tol=rtol, abs_tol=atol)):
            raise WrongAnswer(f"Exercise {label}: {got:.6g} is not the answer — look again.")
    elif isinstance(expected, Sequence):
        if not isinstance(answer, Sequence) or len(answer) != len(expected):
            raise WrongAnswer(f"Exercise {label}: expected {len(expected)} items, got {answer!r}.")
        for a, e in zip(answer, expected):
            check(label, a, e, rtol=rtol, atol=atol)
    elif answer != expected:
        raise WrongAnswer(f"Exercise {label}: {answer!r} is not the answer — look again.")
    print(f"Exercise {label}: correct.")
    return True


def check_function(label: str, fn, reference: Callable, inputs: Sequence[tuple], *, rtol: float = 1e-5,
                   atol: float = 1e-6) -> bool:
    """An implementation exercise: ``fn(*args)`` must match ``reference(*args)`` for every ``args`` in
    ``inputs`` (tensors compared with ``torch.allclose(rtol, atol)``, numbers with ``math.isclose``).
    ``fn is ...`` means not answered yet (returns False); a mismatch raises :class:`WrongAnswer`."""
    if fn is NOT_ANSWERED:
        print(f"Exercise {label}: not answered yet — replace `...` in the answer cell and rerun.")
        return False
    if not callable(fn):
        raise WrongAnswer(f"Exercise {label}: expected a function, got {type(fn).__name__}.")
    for i, args in enumerate(inputs):
        got, want = fn(*args), reference(*args)
        if isinstance(want, torch.Tensor):
            got = torch.as_tensor(got)
            if got.shape != want.shape or not torch.allclose(got.to(want.dtype), want, rtol=rtol, atol=atol):
                raise WrongAnswer(f"Exercise {label}: wrong result on test input {i} "
                                  f"(shape {tuple(got.shape)} vs {tuple(want.shape)}).")
        elif not math.isclose(_as_float(got), _as_float(want), rel_tol=rtol, abs_tol=atol):
            raise WrongAnswer(f"Exercise {label}: wrong result on test input {i}: {got!r} vs {want!r}.")
    print(f"Exercise {label}: correct on {len(inputs)} test inputs.")
    return True


def check_assignment(table, baseline: str, changed: "str | object", *, metric: str = "sFID*",
                     min_seeds: int = 3) -> dict:
    """The end-of-book assignment's automatic checks on a run table (one row per run: ``recipe``, ``seed``,
    metrics — what :func:`hqdit_utils.runs.experiments.run_table` returns).

    Raises :class:`WrongAnswer` (saying what to fix) unless: ``changed`` (a registered name or a
    :class:`~hqdit_utils.engine.recipes.QuantRecipe`) differs from ``baseline`` in exactly one ingredient
    (:data:`~hqdit_utils.engine.recipes.INGREDIENT_FIELDS`) and in nothing else; both ran on the same seeds, at least
    ``min_seeds`` of them; ``metric`` is finite in every row. Returns the paired interval of
    ``metric(changed) − metric(baseline)`` (:func:`hqdit_utils.chapters.tables.paired_interval`) plus ``"ingredient"``.
    """
    name = get_recipe(changed).name
    diff = changed_ingredients(baseline, changed)
    if "other" in diff:
        raise WrongAnswer(f"{name} also changes {diff['other']}, which belong to no ingredient: change one "
                          "ingredient of the recipe and nothing else")
    if len(diff) != 1:
        raise WrongAnswer(f"{name} changes {len(diff)} ingredients ({sorted(diff) or 'none'}) of {baseline}; "
                          "the assignment changes exactly one")
    seeds = {r: set(table.loc[table["recipe"] == r, "seed"]) for r in (baseline, name)}
    if not seeds[baseline] or not seeds[name]:
        missing = [r for r, s in seeds.items() if not s]
        raise WrongAnswer(f"the table has no runs of {missing}: run both recipes with run_table")
    if seeds[baseline] != seeds[name]:
        raise WrongAnswer(f"the two recipes ran different seeds ({sorted(seeds[baseline])} vs {sorted(seeds[name])}); "
                          "pair them: the same seeds for both")
    if len(seeds[name]) < min_seeds:
        raise WrongAnswer(f"{len(seeds[name])} paired seed(s); run at least {min_seeds} so that an interval exists "
                          "and means something")
    values = table.loc[table["recipe"].isin([baseline, name]), metric].astype(float)
    if not values.map(math.isfinite).all():
        raise WrongAnswer(f"{metric} is not finite in every run: check the runs before judging them")
    return {**paired_interval(table, name, baseline, metric), "ingredient": next(iter(diff))}
