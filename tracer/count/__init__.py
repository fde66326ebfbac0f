"""Counting: FLOPs per node under both policies (torch's registry, flopdiff's formulas) and the report document built from a trace (its records, schema and encoding)."""
