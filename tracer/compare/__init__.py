"""Comparing: the run's analytic model, the node -> layer mapping, the diff per stage and layer, gap groups, causes, explain. No torch."""
