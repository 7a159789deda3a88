"""The shape of one entry in the op registry (``ris_stability.linalg.registry``): pure declarations.

An op (:class:`LinalgOp`) is one linear-algebra computation with a spectral hazard, however it is spelled
(``torch.linalg.inv``, ``torch.inverse``, ``Tensor.inverse`` ...); its :class:`Kind` says how a call is
measured and what the call's output already gives (the eigenvalues of eigh, the singular values of svd), so
the statistics reuse it instead of factorising the input again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Which check of ris_stability.linalg.hazards judges an op's sites (the op's hazard in its own terms).
TIE, CONDITION, EIG, PINV = "tie", "condition", "eig", "pinv"
RULES = (TIE, CONDITION, EIG, PINV)


class RegistryError(ValueError):
    """An op or kind that contradicts the registry (unknown kind or rule, a name another op records)."""


@dataclass(frozen=True)
class Output:
    """What a call's output already gives.

    ``spectrum``: "eigenvalues", "singular values" or "" (none returned: the statistics factorise the input);
    ``at``: its index in a tuple output (None: the output is the spectrum itself);
    ``vectors``: the outputs holding eigen/singular vectors (a gradient through them is the tie hazard);
    ``sorted``: real and sorted, so its statistics are an O(n) table, cheap enough for the whole batch."""

    spectrum: str = ""
    at: int | None = None
    vectors: tuple[int, ...] = ()
    sorted: bool = False


@dataclass(frozen=True)
class Kind:
    """How the calls of a kind are measured. ``statistics``: the family of ``linalg.site_stats`` that
    computes them ("" for a kind resolved per call into another, as a norm into its order); ``hermitian``:
    the input is Hermitian by contract (a Hermitian error is then a finding); ``batched``: the calls of a
    step are measured together (concatenated) instead of one by one."""

    name: str
    statistics: str
    output: Output = Output()
    hermitian: bool = False
    batched: bool = True


@dataclass(frozen=True)
class HazardWords:
    """``values``: "eigenvalues" or "singular values"; ``hazard``: the sentence; ``units``: of the statistic."""

    values: str
    hazard: str
    units: str


@dataclass(frozen=True)
class Spelling:
    """An attribute ``owner.attr`` through which the op is called, recorded as op ``name`` ('linalg.inv',
    'inverse'); ``kind`` overrides the op's kind where this spelling returns something else (torch.svd's V
    instead of V^H); ``when`` is a cheap test of (args, kwargs) that lets other calls through unobserved."""

    owner: Any
    attr: str
    name: str
    kind: str = ""
    when: Callable[[tuple, dict], bool] | None = field(default=None, compare=False)

    @property
    def base(self) -> str:
        """The recorded name without its namespace: 'linalg.inv_ex' -> 'inv_ex'."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LinalgOp:
    """One op of the registry. ``name``: the base name its hazard words are filed under ('inv');
    ``words``: its hazard in its own terms (None for an op resolved per call, as a norm into its order);
    ``rule``: the hazards check that judges it (RULES); ``aten``: the aten overload packets the locator
    reads the spectrum of (at this kind's ``Output.at``) when a non-finite value is born downstream."""

    name: str
    kind: str
    words: HazardWords | None
    rule: str = TIE
    spellings: tuple[Spelling, ...] = ()
    aten: tuple[str, ...] = ()

    @property
    def aliases(self) -> tuple[str, ...]:
        """The other base names its spellings record ('inv_ex', 'inverse' for 'inv'), in declaration order."""
        seen = dict.fromkeys(s.base for s in self.spellings)
        return tuple(name for name in seen if name != self.name)
