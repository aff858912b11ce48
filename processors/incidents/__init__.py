"""Incidents: streaming anomaly detection (and its NAB scoring), incident correlation and root-cause ranking
on telemetry; plain Python, with thin Faust apps (``app.py``, ``anomaly_app.py``)."""
