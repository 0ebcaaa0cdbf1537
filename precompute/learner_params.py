"""A learner's parameters, resolved once per job, typed, before any fit.

``--face-lambda auto`` (and any later ``auto`` parameter) means "chosen per class by validation"
(:mod:`.selection`): it is recorded here as a name in ``auto`` and never handed to a learner; the
learner only ever sees numbers. A class's fit carries the values it was fitted with
(``ClassFit.params``), and every later fit of that class (stability folds) reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

AUTO = "auto"

# method -> {parameter: (type, default)} for the parameters a user sets on the command line
TUNABLE: dict[str, dict[str, tuple[type, float]]] = {
    "face": {"face_lambda": (float, 1.0)},
}


class LearnerParamsError(ValueError):
    """A learner parameter that is neither a number of the right type nor ``auto`` where allowed."""


@dataclass(frozen=True)
class LearnerParams:
    """``fixed``: values every fit of the job gets; ``auto``: names chosen per class by selection."""

    method: str
    fixed: dict = field(default_factory=dict)
    auto: frozenset = frozenset()

    def with_chosen(self, chosen: dict) -> dict:
        """The parameters of one fit: the fixed ones and those chosen for the class (all typed)."""
        missing = self.auto - set(chosen)
        if missing:
            raise LearnerParamsError(f"{', '.join(sorted(missing))} of --method {self.method} must be chosen "
                                     f"per class before a fit")
        return {**self.fixed, **chosen}


def resolve_learner_params(method: str, params: dict | None) -> LearnerParams:
    """Type a job's ``method_params`` for ``method``: numbers converted, ``auto`` set apart.

    Raises :class:`LearnerParamsError` for a value that is not a number (or ``auto``)."""
    spec = TUNABLE.get(method, {})
    fixed, auto = {}, set()
    for name, value in (params or {}).items():
        if name not in spec:
            fixed[name] = value  # a learner's own extra setting (e.g. face_tol): passed through as given
            continue
        kind, _ = spec[name]
        if isinstance(value, str) and value.strip().lower() == AUTO:
            auto.add(name)
            continue
        try:
            fixed[name] = kind(value)
        except (TypeError, ValueError):
            raise LearnerParamsError(f"--{name.replace('_', '-')} must be a number or auto, got {value!r}") from None
    for name, (kind, default) in spec.items():
        if name not in fixed and name not in auto:
            fixed[name] = kind(default)
    return LearnerParams(method, fixed, frozenset(auto))


def check_resolved(params: dict) -> None:
    """Refuse an unresolved ``auto`` at a learner's door (a bug upstream, said plainly)."""
    bad = [k for k, v in params.items() if isinstance(v, str) and v.strip().lower() == AUTO]
    if bad:
        raise LearnerParamsError(f"learner parameter(s) {', '.join(bad)} reached a fit as 'auto': they must be "
                                 f"chosen per class first (precompute/selection.py)")
