"""Loggers for the trackers Lightning's own classes fall short on; each imports its client only when used."""
