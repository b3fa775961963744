"""smt-watch: deliver Smart Meter Texas files from an inbox to IntelliWatt, each exactly once."""

__version__ = "0.2.0"
