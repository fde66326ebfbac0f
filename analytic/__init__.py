"""flopdiff analytic overlay: layer objects with FLOP / byte formulas, built per stage from a vendor
config and a workload (`analytic.models`), evaluated under a counting policy (`analytic.layers.Policy`)."""
