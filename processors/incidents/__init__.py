"""Incidents: anomaly detection, incident correlation and root-cause ranking on telemetry (plain Python)."""
