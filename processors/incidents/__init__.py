"""Incident processors: streaming anomaly detection and its NAB scoring (this package may also hold the
incident correlation and root-cause ranking)."""
