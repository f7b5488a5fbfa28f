import os

# Qt tests run offscreen: no display on CI. Set before any Qt import.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
