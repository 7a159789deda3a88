"""The op registry is the one declaration of every linear-algebra entry point: each table that says what an
op is (intercepted entry points, statistics per kind and their batching, hazard rules, the locator's spectral
ops) is derived from it, so an op registered in one place appears in all of them."""
from __future__ import annotations

import types

import pytest
import torch

from ris_stability.instruments.probe import SpectralProbe
from ris_stability.linalg import hazards, registry, site_stats
from ris_stability.linalg.site_names import site_op
from ris_stability.linalg.op_spec import CONDITION, EIG, PINV, TIE, HazardWords, LinalgOp, RegistryError, Spelling
from ris_stability.locate import ops as locate_ops
from ris_stability.observe import intercept

_RULE_TABLES = {CONDITION: hazards.CONDITION_OPS, EIG: hazards.EIG_OPS, PINV: hazards.PINV_OPS}


def _assert_everywhere(op: LinalgOp) -> None:
    """Every derived table holds what the registry says of ``op``."""
    observed = {(id(e.owner), e.attr): (e.name, e.kind) for e in intercept.ENTRY_POINTS}
    for s in op.spellings:
        if hasattr(s.owner, s.attr):
            assert observed[(id(s.owner), s.attr)] == (s.name, s.kind or op.kind), s
        assert registry.lookup(s.name) is op and site_op(f"m:{s.name}@f.py:1") == s.base
    for rule, table in _RULE_TABLES.items():
        for base in (op.name, *op.aliases):
            assert (base in table) is (op.rule == rule), (base, rule)
    for packet in op.aten:
        assert locate_ops._SPECTRAL_OPS[getattr(torch.ops.aten, packet)] == (op.kind, registry.spectrum_at(op))
    assert registry.info(op.name) is op.words
    kind = registry.KINDS[op.kind]
    if kind.statistics:
        assert site_stats.KINDS[op.kind].vector_outputs == kind.output.vectors
        assert site_stats.KINDS[op.kind].hermitian is kind.hermitian
        assert (op.kind in registry.SPECTRUM_KINDS) is kind.output.sorted
        assert (op.kind in site_stats._OUTPUT_KINDS) is (kind.batched and bool(kind.output.spectrum))
        assert (op.kind in site_stats._INPUT_KINDS) is (kind.batched and not kind.output.spectrum)


@pytest.mark.parametrize("name", sorted(registry.OPS))
def test_every_table_is_derived_from_the_registry(name):
    _assert_everywhere(registry.OPS[name])


def test_derived_tables_hold_nothing_the_registry_does_not_declare():
    spellings = {(id(s.owner), s.attr) for op in registry.OPS.values() for s in op.spellings}
    assert {(id(e.owner), e.attr) for e in intercept.ENTRY_POINTS} == spellings
    for rule, table in _RULE_TABLES.items():
        assert set(table) == {b for op in registry.OPS.values() if op.rule == rule for b in (op.name, *op.aliases)}
    packets = {getattr(torch.ops.aten, p) for op in registry.OPS.values() for p in op.aten}
    assert set(locate_ops._SPECTRAL_OPS) == packets
    assert set(site_stats.KINDS) == {k.name for k in registry.KINDS.values() if k.statistics}


@pytest.fixture
def scratch_registry():
    """Registrations made by the test are undone afterwards."""
    saved = (dict(registry._OPS), dict(registry._BY_BASE), dict(registry._KINDS), list(intercept.ENTRY_POINTS),
             dict(site_stats._CUSTOM))
    yield
    intercept.ENTRY_POINTS[:] = saved[3]
    tables = (registry._OPS, registry._BY_BASE, registry._KINDS, site_stats._CUSTOM)
    for table, old in zip(tables, saved[:3] + saved[4:]):
        table.clear()
        table.update(old)
    registry._version += 1


_WORDS = HazardWords("singular values", "test op: inverts its input", "log10 condition number")


def test_an_op_registered_once_appears_in_every_table(scratch_registry):
    lib = types.ModuleType("mylib")  # a user's library: observed like torch.linalg
    lib.my_inv, lib.my_eigh = torch.linalg.inv, torch.linalg.eigh
    inverse = registry.register(LinalgOp("my_inv", "general", _WORDS, CONDITION,
                                         (Spelling(lib, "my_inv", "mylib.my_inv"),)))
    eigh = registry.register(LinalgOp("my_eigh", "eigh", _WORDS, TIE, (Spelling(lib, "my_eigh", "mylib.my_eigh"),),
                                      aten=("linalg_eigh",)))
    for op in (inverse, eigh):
        _assert_everywhere(op)
    assert "my_inv" in hazards.CONDITION_OPS and "my_inv" not in hazards.EIG_OPS | hazards.PINV_OPS
    assert locate_ops._SPECTRAL_OPS[torch.ops.aten.linalg_eigh] == ("eigh", 0)

    singular = torch.tensor([[1.0, 2.0], [2.0, 4.0 + 1e-15]], dtype=torch.float64)
    with SpectralProbe() as probe:
        lib.my_inv(singular)
    (rec,) = probe.collect().values()
    assert rec["op"] == "mylib.my_inv"
    found = hazards.site_hazards("mylib.my_inv", rec, torch.float64)
    assert [h.kind for h in found] == ["ill_conditioned"]  # judged by the rule it was registered with


def test_the_registry_refuses_contradictions(scratch_registry):
    lib = types.ModuleType("mylib")
    lib.f = torch.linalg.inv
    with pytest.raises(RegistryError, match="not declared"):
        registry.register(LinalgOp("a", "no_such_kind", _WORDS, TIE, (Spelling(lib, "f", "a"),)))
    with pytest.raises(RegistryError, match="already records"):
        registry.register(LinalgOp("b", "general", _WORDS, TIE, (Spelling(lib, "f", "lib.inverse"),)))
    with pytest.raises(RegistryError, match="already read by"):
        registry.register(LinalgOp("c", "svd", _WORDS, TIE, aten=("_linalg_svd",)))
    with pytest.raises(RegistryError, match="rule"):
        registry.register(LinalgOp("d", "general", _WORDS, "sometimes"))


def test_a_kind_with_its_own_statistics_is_measured(scratch_registry):
    calls = []

    def trace_stats(flat, out, k):
        calls.append(flat.shape)
        return {"n": torch.full(flat.shape[:-2], float(flat.shape[-1]), dtype=torch.float64)}

    site_stats.register_kind("trace_only", trace_stats)
    lib = types.ModuleType("mylib")
    lib.trace_of = lambda a: a.diagonal(dim1=-2, dim2=-1).sum(-1)
    registry.register(LinalgOp("trace_of", "trace_only", _WORDS, TIE, (Spelling(lib, "trace_of", "mylib.trace_of"),)))
    assert "trace_only" in site_stats.KINDS and "trace_only" not in site_stats._INPUT_KINDS | site_stats._OUTPUT_KINDS
    with SpectralProbe() as probe:
        lib.trace_of(torch.eye(3, dtype=torch.float64))
    (rec,) = probe.collect().values()
    assert rec["op"] == "mylib.trace_of" and rec["stats"]["n"] == 3.0 and calls
