"""The seller's tray app (PySide6), on top of the headless node agent; nothing outside this package
imports Qt."""
