"""glmkit serve: the HTTP edge (app.py), the worker that owns the model (engine.py), schemas, metrics, web page."""
