"""Ringfence on one machine: an embedded AWS (moto) and its event router, the handlers invoked as
Lambda invokes them, the network-namespace lab and its traffic probe, and the live demo's
instances (namespaces with real agents)."""
