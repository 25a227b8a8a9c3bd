"""pynetdicom tuning of the listener: per-association copies of the presentation contexts."""

from __future__ import annotations

import copy

from dicom_node.listener import build_ae
from dicom_node.reactor import ContextList


def _fields(contexts: list[object]) -> list[tuple[object, ...]]:
    return [(c.abstract_syntax, tuple(c.transfer_syntax), c.context_id, c.scu_role,  # type: ignore[attr-defined]
             c.scp_role, c.as_scu, c.as_scp, c.result) for c in contexts]  # type: ignore[attr-defined]


def test_context_copies_equal_deepcopy_and_are_independent(make_settings) -> None:  # type: ignore[no-untyped-def]
    ae = build_ae(make_settings())
    plain = copy.deepcopy(ae.supported_contexts)
    cheap = copy.deepcopy(ContextList(ae.supported_contexts))
    assert _fields(cheap) == _fields(plain)
    assert all(a is not b for a, b in zip(cheap, ae.supported_contexts, strict=True))
    cheap[0]._transfer_syntax.append("1.2.3.4")
    assert "1.2.3.4" not in ae.supported_contexts[0].transfer_syntax
