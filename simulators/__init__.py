"""Running edgefleet at fleet scale on one machine: the local demo, and (next) virtual devices."""
