"""Load an artifact, measure it, judge it against a target's budget."""
