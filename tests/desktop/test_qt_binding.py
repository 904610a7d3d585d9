"""The Qt binding the tray runs on keeps Python's reference counts: PySide6 6.12.0 on CPython before
3.12 lost a reference to None at every call of a method that returns nothing (setText, setVisible...),
so a tray window that updates itself died with "deallocating None" after a few thousand updates. The
locks exclude it; this catches a binding that brings the fault back."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.desktop

from PySide6.QtWidgets import QLabel  # noqa: E402


def test_calls_that_return_nothing_keep_the_reference_count_of_none(qapp) -> None:
    label = QLabel()
    before = sys.getrefcount(None)
    for _ in range(500):
        label.setText("x")
        label.setVisible(False)
    # Other code running meanwhile may take or drop a handful of references; a leak is one per call.
    assert abs(sys.getrefcount(None) - before) < 50
