"""diffalign.samplers (see the issues tracker for the planned contents)."""
