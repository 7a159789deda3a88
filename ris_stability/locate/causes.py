"""The cause table: op / autograd node + input statistics -> a plain-words cause and remedies.

Pure functions over the locator's observations (strings, :class:`TensorSummary`, the input values at
the first bad element). Remedies are suggestions in text; nothing here, or anywhere in the toolkit,
changes the run. The rules are tried in order: phase error and input first, then backward nodes
(the node says more than the aten op inside it: an ``aten.div`` in ``SqrtBackward0`` is "sqrt
backward at 0"), then the aten op itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ris_stability.locate.finding import TensorSummary
from ris_stability.locate.spectral_causes import spectral_cause

Value = float | complex | bool | None


@dataclass(frozen=True)
class Cause:
    """``key`` is a stable short id (for tests and grouping), ``text`` the sentence, ``remedies`` advice."""

    key: str
    text: str
    remedies: tuple[str, ...]


@dataclass(frozen=True)
class Observation:
    """Everything the table may look at. ``culprit``: the op's inputs at the first non-finite output
    element, in argument order (None for an input that is not elementwise), or None when unknown.

    Unlike a :class:`Finding` (the verdict, stored on disk), an observation holds the raw evidence: the
    culprit as values, not words, and no cause yet. Fields: what ran, what it saw, then where it was
    called from (which no rule decides on: the cause's words only name the place)."""

    phase: str
    op: str = ""
    node: str = ""
    culprit: tuple[Value, ...] | None = None
    output: TensorSummary | None = None
    inputs: tuple[TensorSummary, ...] = ()
    message: str = ""
    context: str = ""  # set when the op turned a mask's intentional infinities into NaN
    intentional: bool = False  # the origin itself is a mask's -inf that reached the loss or gradients
    function: str = ""  # the torch-level call, e.g. "torch.linalg.eigh"
    location: str = ""  # file:line of that call; for phase input the path of the bad argument


# --- remedies -------------------------------------------------------------------------------------
EIGVAL_ONLY = ("use an eigenvalue-only loss (torch.linalg.eigvalsh) where eigenvectors are not needed: "
               "its gradient is finite for any spectrum")
FLOAT64_SPECTRAL = "compute the spectral part in float64 / complex128 (cast before the decomposition, back after)"
CLAMP_LOG = ("clamp the log argument away from 0 (x.clamp_min(torch.finfo(x.dtype).tiny)) or parametrise the "
             "quantity so it is positive by construction (softplus, exp of a log-parameter)")
MASK_BEFORE = ("mask before the op, not after: torch.where(ok, x, safe_value) as the op's input (a where applied "
               "after the op still sends NaN into the gradient)")
GUARD_DIV = "guard the denominator: add an epsilon derived from torch.finfo(dtype) or clamp its magnitude"
GUARD_ZERO_ZERO = "handle 0/0 explicitly (torch.where(den == 0, fallback, num / den_safe))"
STABLE_EXP = ("subtract the maximum before exp (use logsumexp / softmax / log_softmax), or clamp the argument "
              "below log(torch.finfo(dtype).max)")
LOG_DOMAIN = "work in the log domain or compute this part in float64"
RESCALE = "normalise the inputs (trace / norm scaling) or compute this part in float64"
SMOOTH_SQRT = ("use sqrt(x + eps) or a smooth norm sqrt(x^2 + eps^2); torch.linalg.vector_norm has a finite "
               "(zero) subgradient at the zero vector")
CLAMP_DOMAIN = "clamp the argument into the op's domain (e.g. x.clamp(-1 + eps, 1 - eps) for acos/asin)"
FIND_EARLIER = ("the value was already non-finite before this call: check the data pipeline, or bisect the "
                "earlier steps (a NaN parameter means an earlier update went non-finite)")
NO_SANITISE = "do not sanitise with nan_to_num: it hides the origin this report is about"
JITTER = ("add diagonal jitter scaled by the matrix (A + eps * tr(A)/n * I, eps from torch.finfo(dtype)) or "
          "use torch.linalg.cholesky_ex and handle info != 0")
SYMMETRISE = "symmetrise the matrix ((A + A^H) / 2) and check that it is built as a Gram matrix"
PHASE_INVARIANT = ("make the loss invariant to each eigenvector's phase: use projectors V V^H, |v_i|^2 or "
                   "|v_i^H a|^2 instead of raw entries of V")
FIX_PHASE = "or fix the phase explicitly (e.g. rotate each vector so its largest entry is real) before using V"
REGULARISE = "regularise (A + lambda * I) or use lstsq / pinv for rank-deficient systems"
FLOAT64_CHECK = "re-run in float64: finite there means precision, non-finite means structure"
INSPECT = "inspect the op's inputs listed above for extreme values"
KEEP_ONE_KEY = ("make sure every query keeps at least one key (e.g. never mask a token's own position, or give "
                "padding queries one unmasked dummy key)")
FINITE_MASK = ("mask with a large finite negative (torch.finfo(dtype).min) instead of -inf, so a fully masked "
               "row softmaxes to a uniform row instead of NaN")
ZERO_MASKED_ROWS = ("or zero the fully masked rows' scores before softmax with torch.where (a where after "
                    "softmax still sends NaN into the gradient)")
MASK_REMEDIES = (KEEP_ONE_KEY, FINITE_MASK, ZERO_MASKED_ROWS)

EIGH_FOR_HERMITIAN = ("if the matrix is Hermitian (e.g. a covariance), use torch.linalg.eigh: real sorted eigenvalues, "
                      "orthonormal eigenvectors, no V^{-H} in its backward")
SUBSPACE_ONLY = ("make the loss depend only on a subspace separated by a real gap (a projector onto the top-K), "
                 "never on individual vectors inside a cluster")
EIG_REMEDIES = (EIGH_FOR_HERMITIAN, SUBSPACE_ONLY, FLOAT64_SPECTRAL, EIGVAL_ONLY)


def op_base(op: str) -> str:
    """'aten.div_.Tensor' -> 'div', 'aten._linalg_eigh' -> 'linalg_eigh', 'aten.log' -> 'log'."""
    parts = op.split(".")
    name = parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[0]
    return name.strip("_")


def node_base(node: str) -> str:
    """'LinalgEighBackward0' -> 'linalgeigh', 'SqrtBackward0' -> 'sqrt'."""
    return re.sub(r"Backward\d*$", "", node).lower()


def exp_overflow_threshold(dtype: str) -> float:
    """log(finfo.max): the smallest argument at which exp overflows in ``dtype`` (e.g. 'float32')."""
    real = getattr(torch, dtype, torch.float32)
    real = real.to_real() if real.is_complex else real
    return math.log(torch.finfo(real).max)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"


def _is(value: Value, pred: Callable[[float], bool]) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and pred(float(value))


def _out_kind(obs: Observation) -> str:
    if obs.output is not None and obs.output.nan == 0 and obs.output.inf > 0:
        return "inf"
    return "NaN"


def _spectral(obs: Observation) -> Mapping[str, float] | None:
    for s in obs.inputs:
        if s.spectral and "max_cluster" in s.spectral:
            return s.spectral
    return None


# --- phase error and input --------------------------------------------------------------------------
def _error_cause(obs: Observation) -> Cause:
    msg = obs.message.lower()
    line = _first_line(obs.message)
    if "positive-definite" in msg or "positive definite" in msg:
        return Cause("not_positive_definite", f"matrix is not positive definite: {line}",
                     (JITTER, SYMMETRISE, FLOAT64_SPECTRAL, INSPECT))
    if "e^{i phi}" in msg or ("eigenvectors" in msg and "ill-defined" in msg):
        return Cause("eigenvector_phase", f"the loss depends on the arbitrary phase of complex eigenvectors: {line}",
                     (PHASE_INVARIANT, FIX_PHASE, EIGVAL_ONLY))
    if "singular" in msg:
        return Cause("singular_matrix", f"matrix is singular: {line}", (REGULARISE, FLOAT64_SPECTRAL))
    if "converge" in msg:
        return Cause("no_convergence", f"decomposition did not converge (input badly scaled or non-finite): {line}",
                     (RESCALE, FLOAT64_SPECTRAL, INSPECT))
    return Cause("raised", f"{obs.op or obs.function or 'the call'} raised: {line}", (INSPECT,))


def _input_cause(obs: Observation) -> Cause:
    s = obs.inputs[0] if obs.inputs else None
    counts = f"{s.nan} NaN and {s.inf} Inf" if s is not None else "NaN/Inf"
    if obs.op:  # seen only when an op consumed it: a global, a closure variable or a captured attribute
        return Cause("bad_hidden_input", f"a tensor that was not an argument (a global, closure variable or "
                     f"attribute) already held {counts} when {obs.op} used it", (FIND_EARLIER, NO_SANITISE))
    return Cause("bad_input", f"argument {obs.location or '?'} already holds {counts} before the call",
                 (FIND_EARLIER, NO_SANITISE))


# --- backward nodes ---------------------------------------------------------------------------------
def _eigh_cause(obs: Observation, what: str) -> Cause:
    return Cause(*spectral_cause(what, obs.inputs, obs.function, obs.location, _out_kind(obs)))


_SIMPLE_NODES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sqrt": ("sqrt_backward_zero", "sqrt backward at 0 (d sqrt(x)/dx = 1/(2 sqrt(x)) is infinite there)",
             (SMOOTH_SQRT, MASK_BEFORE)),
    "rsqrt": ("rsqrt_backward_zero", "rsqrt backward at 0", (SMOOTH_SQRT, MASK_BEFORE)),
    "log": ("log_backward_zero", "log backward at 0 (d log(x)/dx = 1/x)", (CLAMP_LOG, MASK_BEFORE)),
    "div": ("div_backward_overflow",
            "division backward overflow: the gradient w.r.t. the denominator b scales as a/b^2 and b is tiny",
            (GUARD_DIV, RESCALE)),
    "pow": ("pow_backward",
            "pow backward overflow: p * x^(p-1) is infinite at x = 0 for p < 1 and overflows for large |x|",
            (MASK_BEFORE, GUARD_DIV, LOG_DOMAIN)),
    "acos": ("acos_backward_edge", "acos backward at |x| = 1 (1/sqrt(1 - x^2))", (CLAMP_DOMAIN,)),
    "asin": ("asin_backward_edge", "asin backward at |x| = 1 (1/sqrt(1 - x^2))", (CLAMP_DOMAIN,)),
    "linalgcholesky": ("cholesky_backward", "cholesky backward through a (nearly) singular factor",
                       (JITTER, FLOAT64_SPECTRAL)),
    "linalginv": ("inverse_backward", "inverse backward through a (nearly) singular matrix",
                  (REGULARISE, FLOAT64_SPECTRAL)),
    "linalgsolve": ("solve_backward", "solve backward through a (nearly) singular matrix",
                    (REGULARISE, FLOAT64_SPECTRAL)),
}


def _eig_cause(obs: Observation) -> Cause:
    """LinalgEigBackward0: the general eig backward divides the eigenvector terms by w_j - w_i of every
    pair and applies V^{-H}, so ties and ill-conditioned (non-orthogonal) eigenvectors both blow it up."""
    st = _spectral(obs) or {}
    cluster, gap = st.get("max_cluster", math.nan), st.get("min_gap", math.nan)
    if cluster >= 2:
        kind = "exact_tie" if gap == 0 else "near_tie"
        return Cause(f"eig_{kind}",
                     f"eigenvector gradient of a general eig through {'exactly' if gap == 0 else 'nearly'} tied "
                     f"eigenvalues (cluster of {int(cluster)} at |lambda| {st.get('cluster_value', math.nan):.1e}, "
                     f"smallest |gap| {gap:.1e}): the eig backward divides by w_j - w_i", EIG_REMEDIES)
    gaps = f" (smallest |gap| {gap:.1e})" if math.isfinite(gap) else ""
    return Cause("eig_backward",
                 f"non-finite eigenvector gradient in eig backward{gaps}: it divides by every eigenvalue "
                 "difference and applies the inverse of the eigenvector matrix, which is ill-conditioned for "
                 "a non-normal (non-Hermitian) input", EIG_REMEDIES)


def _backward_cause(obs: Observation) -> Cause | None:
    base = node_base(obs.node)
    if "eigh" in base:
        return _eigh_cause(obs, "eigh")
    if base == "linalgeig":
        return _eig_cause(obs)
    if "svd" in base:
        return _eigh_cause(obs, "svd")
    if "norm" in base:
        return Cause("norm_backward_zero", "norm backward at the zero vector (0/0)", (SMOOTH_SQRT, MASK_BEFORE))
    if base in _SIMPLE_NODES:
        key, text, remedies = _SIMPLE_NODES[base]
        return Cause(key, text, remedies)
    return None


# --- forward ops (and the fallback for backward nodes without a rule) --------------------------------
def _log_cause(obs: Observation, name: str) -> Cause:
    arg = 1 if name == "xlogy" else 0  # xlogy(x, y) = x * log(y): the log's argument is y
    x = obs.culprit[arg] if obs.culprit and len(obs.culprit) > arg else None
    edge = -1.0 if name == "log1p" else 0.0
    zero = _is(x, lambda v: v == edge) or (x is None and len(obs.inputs) > arg and obs.inputs[arg].zeros > 0
                                           and edge == 0)
    if zero:
        return Cause("log_zero", f"{name} of {edge:g}", (CLAMP_LOG, MASK_BEFORE))
    return Cause("log_negative", f"{name} of a number below {edge:g} (NaN)", (CLAMP_LOG, MASK_BEFORE))


_LOW_PRECISION = ("float16", "bfloat16")
LOW_PRECISION_NORM = ("compute norms and reductions in float32 (x.float()), or keep this op outside autocast; "
                      "torch.linalg.vector_norm accumulates in higher precision")


def _div_cause(obs: Observation) -> Cause:
    a, b = (obs.culprit + (None, None))[:2] if obs.culprit else (None, None)
    if _is(a, lambda v: v == 0) and _is(b, lambda v: v == 0):
        return Cause("div_zero_zero", "0/0 in division", (GUARD_ZERO_ZERO, MASK_BEFORE))
    if _is(b, lambda v: v == 0):
        low = next((s.dtype for s in obs.inputs if s.dtype in _LOW_PRECISION), None)
        if low is not None:  # a half-precision denominator is most often a value that underflowed to 0
            tiny = torch.finfo(getattr(torch, low)).smallest_normal
            return Cause("div_by_zero", f"division by 0 in {low}: the denominator is 0, most likely underflowed "
                         f"({low} flushes magnitudes below ~{tiny:.1e} toward 0; squares of values below "
                         f"~{math.sqrt(tiny):.1e} vanish)", (LOW_PRECISION_NORM, GUARD_DIV, MASK_BEFORE))
        return Cause("div_by_zero", "division by 0", (GUARD_DIV, MASK_BEFORE))
    if a is None and b is None and _out_kind(obs) == "NaN":
        return Cause("div_zero_zero", "0/0 in division", (GUARD_ZERO_ZERO, MASK_BEFORE))
    dtype = obs.inputs[0].dtype if obs.inputs else "float"
    return Cause("div_overflow", f"overflow in division (|a/b| exceeds the largest {dtype})", (GUARD_DIV, RESCALE))


def _exp_cause(obs: Observation, name: str) -> Cause:
    text = f"overflow to inf in {name}"
    if obs.inputs and obs.inputs[0].max is not None:
        s = obs.inputs[0]
        text += f" (argument up to {s.max:.4g} > log(max {s.dtype}) = {exp_overflow_threshold(s.dtype):.4g})"
    return Cause("exp_overflow", text, (STABLE_EXP, LOG_DOMAIN))


def _pow_cause(obs: Observation) -> Cause:
    base, expo = (obs.culprit + (None, None))[:2] if obs.culprit else (None, None)
    if _is(base, lambda v: v == 0) and _is(expo, lambda v: v < 0):
        return Cause("pow_zero_negative", "0 raised to a negative power", (GUARD_DIV, MASK_BEFORE))
    if _is(base, lambda v: v < 0) and _is(expo, lambda v: v != round(v)):
        return Cause("pow_negative_fractional", "negative base raised to a fractional power (NaN)",
                     (CLAMP_DOMAIN, MASK_BEFORE))
    return Cause("pow_overflow", "overflow in pow", (LOG_DOMAIN, RESCALE))


_OVERFLOW_OPS = frozenset({"mul", "add", "sub", "sum", "mean", "mm", "bmm", "matmul", "addmm", "baddbmm",
                           "dot", "vdot", "cumsum", "prod", "square", "linear", "einsum", "addcmul", "var",
                           "convolution", "conv1d", "conv2d", "conv3d", "_convolution"})
_LINALG_OP = re.compile(r"linalg|cholesky|eig|svd|^qr$|^lu|inverse|solve|^(log|slog)?det$")


def is_linalg_op(op: str) -> bool:
    """True for a linear-algebra aten op ('aten._linalg_eigh', 'aten.cholesky_inverse'), by its base name."""
    return bool(_LINALG_OP.search(op_base(op)))


def _mask_cause(obs: Observation) -> Cause:
    """NaN made from a mask's intentional -inf (obs.context says where the -inf was written)."""
    name = op_base(obs.op)
    c = obs.culprit or ()
    if name in ("softmax", "log_softmax") and len(c) == 4 and _is(c[0], lambda v: v == -math.inf):
        return Cause("masked_row_softmax", f"{name.replace('_', ' ')} over a row that is entirely -inf: every key "
                     f"is masked ({c[3]} of {c[3]} entries -inf, exp(-inf - -inf) = NaN)", MASK_REMEDIES)
    if name in ("softmax", "log_softmax") and len(c) == 4:
        return Cause("masked_softmax_inf", f"{name.replace('_', ' ')} over a row holding +inf (inf - inf = NaN)",
                     MASK_REMEDIES)
    if name in ("add", "sub", "rsub") :
        return Cause("inf_minus_inf", f"inf - inf in {name}: two masked (infinite) values cancel to NaN",
                     (FINITE_MASK, MASK_BEFORE))
    if name in ("mul", "matmul", "mm", "bmm", "addmm", "baddbmm", "linear", "einsum"):
        return Cause("zero_times_inf", f"0 * inf in {name}: a masked (infinite) value multiplied by 0 gives NaN",
                     (FINITE_MASK, MASK_BEFORE))
    return Cause("mask_to_nan", f"{name} turned the infinite values of a mask into NaN", (FINITE_MASK, MASK_BEFORE))


def _op_cause(obs: Observation) -> Cause:
    name = op_base(obs.op)
    if obs.context:
        return _mask_cause(obs)
    if obs.intentional:
        return Cause("mask_reached_loss", f"the -inf written on purpose by {obs.op or 'a mask'} reached the loss or "
                     "the gradients unchanged (e.g. a max / logsumexp over a fully masked row)", MASK_REMEDIES)
    if obs.culprit and any(_is(v, lambda x: not math.isfinite(x)) for v in obs.culprit):
        return Cause("nonfinite_constant", f"a non-finite constant passed to {obs.op}", (INSPECT,))
    if name in ("log", "log2", "log10", "log1p", "xlogy"):
        return _log_cause(obs, name)
    if name in ("div", "true_divide", "reciprocal"):
        return _div_cause(obs) if name != "reciprocal" else Cause("div_by_zero", "reciprocal of 0", (GUARD_DIV,))
    if name in ("exp", "exp2", "expm1", "sinh", "cosh"):
        return _exp_cause(obs, name)
    if name == "pow":
        return _pow_cause(obs)
    if name == "sqrt":
        return Cause("sqrt_negative", "sqrt of a negative number (NaN)", (CLAMP_DOMAIN, MASK_BEFORE))
    if name == "rsqrt":
        return Cause("rsqrt_zero", "rsqrt of 0 or of a negative number", (SMOOTH_SQRT, MASK_BEFORE))
    if name in ("acos", "asin", "atanh", "acosh"):
        return Cause("domain", f"{name} of a value outside its domain (NaN)", (CLAMP_DOMAIN, MASK_BEFORE))
    if name in _OVERFLOW_OPS:
        return Cause("overflow", f"overflow to inf in {name}", (RESCALE, FLOAT64_CHECK))
    if is_linalg_op(obs.op):
        return Cause("linalg_nonfinite", f"{name} returned non-finite values from a finite matrix",
                     (FLOAT64_SPECTRAL, RESCALE, INSPECT))
    return Cause("nonfinite", f"non-finite output ({_out_kind(obs)}) of {obs.op or 'an op'} from finite inputs",
                 (FLOAT64_CHECK, INSPECT))


def explain(obs: Observation) -> Cause:
    """The cause and remedies for one observation (see module docstring for the rule order)."""
    if obs.phase == "error":
        return _error_cause(obs)
    if obs.phase == "input":
        return _input_cause(obs)
    if obs.phase == "backward" and obs.node:
        cause = _backward_cause(obs)
        if cause is not None:
            return cause
        fallback = _op_cause(obs)
        return Cause(fallback.key, f"{fallback.text} in {obs.node}", fallback.remedies)
    return _op_cause(obs)
