"""Painted pieces of the tray window: the state icon, a small chart, and a labelled meter. Drawn with
QPainter so the app ships no image files and looks the same on every OS.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QIcon, QPainter, QPainterPath, QPen, QPixmap
from PySide6.QtWidgets import QFrame, QLabel, QSizePolicy, QVBoxLayout, QWidget

from compute_swarm.desktop.tray.state import IconState

STATE_COLORS: dict[IconState, str] = {
    "earning": "#34c759",
    "idle": "#4aa3ff",
    "paused": "#f5a623",
    "waiting": "#bf9bff",
    "offline": "#8a94a6",
    "error": "#ff453a",
}
TEXT = "#e8ecf3"
MUTED = "#8a94a6"
GRID = "#2a3140"


def state_icon(state: IconState, size: int = 64) -> QIcon:
    """A chip in the state's colour with a glyph (play, pause, dot, clock, ring, cross), readable at
    16 px."""
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    color = QColor(STATE_COLORS[state])
    margin = size * 0.06
    body = QRectF(margin, margin, size - 2 * margin, size - 2 * margin)
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(QColor("#1b2130"))
    painter.drawRoundedRect(body, size * 0.22, size * 0.22)
    painter.setBrush(color)
    center, radius = body.center(), body.width() * 0.30
    if state == "earning":
        triangle = QPainterPath()
        triangle.moveTo(center.x() - radius * 0.7, center.y() - radius)
        triangle.lineTo(center.x() + radius, center.y())
        triangle.lineTo(center.x() - radius * 0.7, center.y() + radius)
        triangle.closeSubpath()
        painter.drawPath(triangle)
    elif state == "paused":
        width = radius * 0.55
        for x in (center.x() - radius * 0.75, center.x() + radius * 0.2):
            painter.drawRoundedRect(QRectF(x, center.y() - radius, width, 2 * radius), 2, 2)
    elif state == "idle":
        painter.drawEllipse(center, radius * 0.8, radius * 0.8)
    elif state == "waiting":  # a clock face: someone else's move
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(_round_pen(color, size * 0.07))
        painter.drawEllipse(center, radius, radius)
        painter.drawLine(center, QPointF(center.x(), center.y() - radius * 0.65))
        painter.drawLine(center, QPointF(center.x() + radius * 0.5, center.y()))
    elif state == "offline":
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(QPen(color, size * 0.08))
        painter.drawEllipse(center, radius * 0.8, radius * 0.8)
    else:
        painter.setPen(_round_pen(color, size * 0.1))
        painter.drawLine(
            QPointF(center.x() - radius, center.y() - radius),
            QPointF(center.x() + radius, center.y() + radius),
        )
        painter.drawLine(
            QPointF(center.x() + radius, center.y() - radius),
            QPointF(center.x() - radius, center.y() + radius),
        )
    painter.end()
    return QIcon(pixmap)


def _round_pen(color: QColor, width: float) -> QPen:
    # PySide6's QPen takes no keyword arguments: the cap is set after.
    pen = QPen(color, width)
    pen.setCapStyle(Qt.PenCapStyle.RoundCap)
    return pen


class Chart(QWidget):
    """A small line or bar chart with its last value and range written on it."""

    def __init__(self, kind: str, color: str, unit: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.kind = kind  # "line" or "bars"
        self.color = QColor(color)
        self.unit = unit
        self.values: list[float] = []
        self.labels: list[str] = []  # under the bars: first and last are drawn
        # Bars only: a second series drawn beside each bar (electricity beside earnings), in its color.
        self.overlay: list[float] = []
        self.overlay_color = QColor(STATE_COLORS["error"])
        self.threshold: float | None = None  # a dashed line (the temperature limit)
        self.threshold_caption = "limit"  # written on the dashed line, with its value
        self.empty_text = "no data yet"
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_values(
        self, values: Sequence[float], labels: Sequence[str] = (), overlay: Sequence[float] = ()
    ) -> None:
        self.values, self.labels, self.overlay = list(values), list(labels), list(overlay)
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, small.pointSizeF() * 0.85))
        painter.setFont(small)
        area = QRectF(self.rect()).adjusted(4, 4, -4, -18)
        painter.setPen(QPen(QColor(GRID), 1))
        painter.drawLine(area.bottomLeft(), area.bottomRight())
        if not self.values or (self.kind == "bars" and not any(self.values) and not any(self.overlay)):
            painter.setPen(QColor(MUTED))
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, self.empty_text)
            self._draw_labels(painter, area)
            return
        top = max([*self.values, *self.overlay, self.threshold or 0.0])
        # A line's scale starts a little under its lowest point, so a few degrees do not look like a cliff.
        bottom = 0.0 if self.kind == "bars" else max(0.0, min(self.values) - 15)
        if self.kind == "line":
            # Room above for the value written at the top right, clear of the dashed limit: next to
            # the line, a reading looked like the limit's value.
            top += max(5.0, (top - bottom) * 0.3)
        if top <= bottom:
            top = bottom + 1

        def y(value: float) -> float:
            return area.bottom() - (value - bottom) / (top - bottom) * area.height() * 0.9

        if self.threshold is not None:
            painter.setPen(QPen(QColor(STATE_COLORS["paused"]), 1, Qt.PenStyle.DashLine))
            painter.drawLine(
                QPointF(area.left(), y(self.threshold)), QPointF(area.right(), y(self.threshold))
            )
            painter.drawText(
                QRectF(area.left() + 2, y(self.threshold) - 16, area.width() / 2, 15),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom,
                f"{self.threshold_caption} {self.threshold:.0f}{self.unit}",
            )
        painter.setPen(Qt.PenStyle.NoPen)
        if self.kind == "bars":
            slot = area.width() / len(self.values)
            # With an overlay, each slot holds two bars side by side; alone, one wide bar.
            series = [(self.values, self.color, 0.15, 0.7)]
            if self.overlay:
                series = [(self.values, self.color, 0.1, 0.4), (self.overlay, self.overlay_color, 0.5, 0.4)]
            for values, color, offset, width in series:
                painter.setBrush(color)
                for index, value in enumerate(values):
                    height = area.bottom() - y(max(value, 0.0))
                    if value > 0:
                        height = max(height, 2.0)
                    painter.drawRoundedRect(
                        QRectF(
                            area.left() + index * slot + slot * offset,
                            area.bottom() - height,
                            slot * width,
                            height,
                        ),
                        2,
                        2,
                    )
        else:
            step = area.width() / max(len(self.values) - 1, 1)
            line = QPainterPath(QPointF(area.left(), y(self.values[0])))
            for index, value in enumerate(self.values[1:], start=1):
                line.lineTo(area.left() + index * step, y(value))
            painter.setPen(QPen(self.color, 2))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawPath(line)
        painter.setPen(QColor(TEXT))
        last = f"{self.values[-1]:.0f}{self.unit}" if self.kind == "line" else ""
        painter.drawText(
            area.adjusted(0, 0, -2, 0), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop, last
        )
        self._draw_labels(painter, area)

    def _draw_labels(self, painter: QPainter, area: QRectF) -> None:
        if not self.labels:
            return
        painter.setPen(QColor(MUTED))
        below = QRectF(area.left(), area.bottom() + 2, area.width(), 16)
        painter.drawText(below, Qt.AlignmentFlag.AlignLeft, self.labels[0])
        painter.drawText(below, Qt.AlignmentFlag.AlignRight, self.labels[-1])


class Meter(QWidget):
    """A thin bar with a caption on the left and the value on the right, for utilisation and VRAM."""

    def __init__(self, caption: str, color: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.caption = caption
        self.color = QColor(color)
        self.fraction: float | None = None
        self.text = "—"
        self.setMinimumHeight(30)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_value(self, fraction: float | None, text: str) -> None:
        self.fraction = None if fraction is None else min(max(fraction, 0.0), 1.0)
        self.text = text
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        width = self.width()
        painter.setPen(QColor(MUTED))
        painter.drawText(QRectF(0, 0, width, 16), Qt.AlignmentFlag.AlignLeft, self.caption)
        painter.setPen(QColor(TEXT))
        painter.drawText(QRectF(0, 0, width, 16), Qt.AlignmentFlag.AlignRight, self.text)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(GRID))
        painter.drawRoundedRect(QRectF(0, 20, width, 6), 3, 3)
        if self.fraction is not None:
            painter.setBrush(self.color)
            painter.drawRoundedRect(QRectF(0, 20, max(width * self.fraction, 6), 6), 3, 3)


def card(title: str, frame: QFrame | None = None) -> tuple[QFrame, QVBoxLayout]:
    """A rounded panel (a new one, or `frame` made into one) with its title; the caller adds its
    widgets to the layout."""
    frame = frame if frame is not None else QFrame()
    frame.setObjectName("card")
    layout = QVBoxLayout(frame)
    layout.setContentsMargins(14, 12, 14, 12)
    layout.setSpacing(6)
    heading = QLabel(title)
    heading.setObjectName("title")
    layout.addWidget(heading)
    return frame, layout


def label(text: str = "", name: str | None = None) -> QLabel:
    widget = QLabel(text)
    if name:
        widget.setObjectName(name)
    widget.setWordWrap(True)
    return widget
