"""`ponder ui`: a local page over a trace store (runtime/tracestore.py): the live decision stream,
a per-key timeline (raw signal, gate score, escalations, decisions on one time axis) and the
explain view. Its assets ship in `ponder/ui/static/` and load nothing from elsewhere."""

from ponder.ui.app import create_app, serve

__all__ = ["create_app", "serve"]
