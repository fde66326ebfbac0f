"""Mapping: declarative tables (`tables/<model>.yaml`) from module-path patterns to analytic layer ids,
and the engine that joins graph nodes to analytic layers (`mapping.engine`)."""
