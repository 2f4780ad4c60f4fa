"""The ground floor: the state record on a graph, PEFT's key names, graph and file mechanics.

Imports nothing from the floors above (math, sites, passes, exporters, cli).
"""

__all__: list[str] = []
