"""``sftlab serve`` (alias ``sftlab api``): an OpenAI-compatible HTTP server over a trained model (see docs/serve.md).

engine.py: one continuously batched decode loop over the model; app.py: the FastAPI endpoints over it.
"""
