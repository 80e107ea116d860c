"""The embedded demo model (temporary; the demo engineer fills this package)."""
