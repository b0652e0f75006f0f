"""The hqdit command line: every sub-command and what they share."""
