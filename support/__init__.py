"""Support code, not the method: the checks, errors, atomic files, manifests, resumable bookkeeping
and model I/O that keep the chapters (data.py ... evaluate.py) safe. Each chapter's header names
the module here that holds its hardening; nothing here imports a chapter."""
