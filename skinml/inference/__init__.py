"""The model as served: the pyfunc MLflow builds from code (`pyfunc.py`), what a request
may be (`requests.py`: the image column, limits, one-line 400s), decoding its images
(`decoder.py`), and the one batching path every caller's rows go through
(`coalescer.py`). Built from `models`, `data` and `core`; it knows nothing of tracking:
`tracking/logged_model.py` logs it, `serving/` puts it behind a server.
"""
