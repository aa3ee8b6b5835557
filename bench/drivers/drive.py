"""Launcher: `python drive.py LIB COMMAND ...` imports drivers/LIB.py by its module name (so the
job functions have an importable path, which rq, celery and others record) and runs it."""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
module = importlib.import_module(sys.argv.pop(1))
module.cli()
