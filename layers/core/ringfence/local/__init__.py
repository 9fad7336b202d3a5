"""Running the control plane on one machine: an embedded AWS (moto), its event router, local
wiring; the network-namespace lab and its traffic probe, and the live demo's instances
(namespaces with real agents)."""
