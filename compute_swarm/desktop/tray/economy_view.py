"""The window's money cards: the forecast, the jobs with their energy and receipts, and the payouts;
with the dialogs that ask for a payout and show a receipt. They show what they are given (the words
come from tray.economy) and say what the seller asked for as signals; the app does the asking.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QWidget,
)

from compute_swarm.desktop.tray.economy import ForecastText, JobLine
from compute_swarm.desktop.tray.widgets import STATE_COLORS, Chart, card, label
from compute_swarm.money import MoneyError, parse_micro

JOBS_LISTED = 20
VISIBLE_JOBS = 4  # the list's height in jobs; the rest scroll


class ForecastCard(QFrame):
    def __init__(self) -> None:
        super().__init__()
        _, layout = card("What this PC could earn", self)
        self.headline = label("Asking the swarm for its market figures…")
        self.basis = label("", "muted")
        layout.addWidget(self.headline)
        layout.addWidget(self.basis)

    def show_forecast(self, forecast: ForecastText | None, problem: str | None = None) -> None:
        if forecast is None:
            self.headline.setText("No forecast: " + (problem or "the swarm's figures are not in yet"))
            self.basis.setText("")
            return
        self.headline.setText(forecast.headline)
        self.basis.setText(forecast.basis)


class JobsCard(QFrame):
    receipt_requested = Signal(str)  # a job id

    def __init__(self) -> None:
        super().__init__()
        _, layout = card("Jobs: pay and electricity", self)
        self.empty = label("No jobs yet: each job's pay, energy and electricity will show here.", "muted")
        self.chart = Chart("bars", STATE_COLORS["earning"])
        self.legend = label("", "muted")
        self.jobs = QListWidget()
        self.jobs.setWordWrap(True)  # a job's line wraps in the card, never scrolls sideways
        self.jobs.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.jobs.setResizeMode(QListView.ResizeMode.Adjust)
        self.jobs.itemDoubleClicked.connect(self._ask_receipt)
        self.energy_source = label("", "muted")
        self.receipt_button = QPushButton("Show receipt")
        self.receipt_button.clicked.connect(
            lambda: self._ask_receipt(self.jobs.currentItem() or self.jobs.item(0))
        )
        buttons = QHBoxLayout()
        buttons.addWidget(self.energy_source, 1)
        buttons.addWidget(self.receipt_button, 0, Qt.AlignmentFlag.AlignTop)
        for widget in (self.empty, self.chart, self.legend, self.jobs):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        self.show_jobs([], [], [], None, "")

    def show_jobs(
        self, lines: list[JobLine], pay: list[float], electricity: list[float], source: str | None, unit: str
    ) -> None:
        """The latest jobs (newest first), and the chart of what each paid beside its electricity, in
        `unit` (a currency, or credits when nothing converts)."""
        self.jobs.clear()
        for line in lines[:JOBS_LISTED]:
            item = QListWidgetItem(line.text)
            item.setData(Qt.ItemDataRole.UserRole, line.job_id)
            self.jobs.addItem(item)
        has_jobs = bool(lines)
        for widget in (self.chart, self.legend, self.jobs, self.receipt_button):
            widget.setVisible(has_jobs)
        self.empty.setVisible(not has_jobs)
        # Room for each shown job's line wrapped in two (the list's width is not known before it is laid out).
        rows = min(max(len(lines), 1), VISIBLE_JOBS)
        self.jobs.setFixedHeight(rows * (2 * self.jobs.fontMetrics().lineSpacing() + 8) + 6)
        self.chart.set_values(pay, [], electricity)
        self.legend.setText(
            f"each job, latest on the right, in {unit}: green what it pays · red its electricity"
            if electricity
            else f"what each job pays, in {unit}, latest on the right"
        )
        self.energy_source.setText(f"Energy {source}" if source else "")

    def _ask_receipt(self, item: QListWidgetItem | None) -> None:
        if item is not None:
            self.receipt_requested.emit(item.data(Qt.ItemDataRole.UserRole))


class PayoutsCard(QFrame):
    payout_requested = Signal()

    def __init__(self) -> None:
        super().__init__()
        _, layout = card("Payouts", self)
        self.balances = label("Connect to see what can be paid out.", "muted")
        self.payouts = label("")
        self.error = label("", "error")
        self.error.hide()
        buttons = QHBoxLayout()
        self.request_button = QPushButton("Request a payout…")
        self.request_button.clicked.connect(self.payout_requested.emit)
        buttons.addStretch(1)
        buttons.addWidget(self.request_button)
        for widget in (self.balances, self.payouts, self.error):
            layout.addWidget(widget)
        layout.addLayout(buttons)
        self.request_button.setEnabled(False)  # until the swarm says what may be paid out

    def show_payouts(self, balances: str, lines: list[str]) -> None:
        self.request_button.setEnabled(True)
        self.balances.setText(balances)
        self.payouts.setText("\n".join(lines) if lines else "No payouts yet.")
        self.payouts.setObjectName("" if lines else "muted")
        self.payouts.style().polish(self.payouts)

    def show_error(self, message: str | None) -> None:
        self.error.setText(message or "")
        self.error.setVisible(bool(message))


class PayoutDialog(QDialog):
    """Where to be paid and how much (empty: all that is available); checked here before it is sent."""

    def __init__(self, payee: str, style_sheet: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Request a payout")
        self.setStyleSheet(style_sheet)
        self.payee = QLineEdit(payee)
        self.payee.setPlaceholderText("e-mail, account or wallet the swarm operator pays to")
        self.credits = QLineEdit()
        self.credits.setPlaceholderText("all that is available")
        self.error = label("", "error")
        self.error.hide()
        form = QFormLayout(self)
        form.addRow(
            label(
                "The swarm operator pays outside the app, to the payee you give, and marks the payout paid.",
                "muted",
            )
        )
        form.addRow("Pay to", self.payee)
        form.addRow("Credits", self.credits)
        form.addRow(self.error)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Request payout")
        buttons.accepted.connect(self._check)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.result_payee: str | None = None
        self.result_amount_micro: int | None = None

    def _check(self) -> None:
        payee = " ".join(self.payee.text().split())
        if not payee:
            self._say("Say where to be paid.")
            return
        if len(payee) > 200:
            self._say("Where to be paid is at most 200 characters.")
            return
        amount = None
        if self.credits.text().strip():
            try:
                amount = parse_micro(self.credits.text(), "amount of credits")
            except MoneyError as error:
                self._say(str(error)[:1].upper() + str(error)[1:])
                return
            if amount == 0:
                self._say("Ask for more than 0 credits, or leave it empty for all that is available.")
                return
        self.result_payee, self.result_amount_micro = payee, amount
        self.accept()

    def _say(self, message: str) -> None:
        self.error.setText(message)
        self.error.show()


class ReceiptDialog(QDialog):
    def __init__(self, text: str, style_sheet: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Job receipt")
        self.setStyleSheet(style_sheet)
        self.setMinimumWidth(460)
        form = QFormLayout(self)
        self.text = label(text)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow(self.text)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
