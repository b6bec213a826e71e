"""The compliance console (`trainwatch serve`): a server-rendered web app and JSON API on the knowledge store.

config.py (settings, password hashing), auth.py (roles, sessions, CSRF, login throttle), redact.py (what the
analyst role may see), views.py (queue and case data), plot.py (cumulative compute), pdf.py (the draft report as
PDF), app.py (routes). Only app.py imports the web framework.
"""
