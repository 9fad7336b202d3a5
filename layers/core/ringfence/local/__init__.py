"""Ringfence on one machine: the network-namespace lab, the traffic probe, and the live demo's
pieces (embedded AWS, event router and instance fleet)."""
