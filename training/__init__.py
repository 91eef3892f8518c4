"""Offline training and export of the rnnserve model zoo (never imported by serving)."""
