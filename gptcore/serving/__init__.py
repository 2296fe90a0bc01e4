"""``gptcore serve``: the OpenAI-compatible HTTP server (``app.py``) over the engine thread (``worker.py``)."""
