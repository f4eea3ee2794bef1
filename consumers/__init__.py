"""The replica side: materialiser, undo log, recovery points and views."""
