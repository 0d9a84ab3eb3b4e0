"""diffalign.rewards (see the issues tracker for the planned contents)."""
