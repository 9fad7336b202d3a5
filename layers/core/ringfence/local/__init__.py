"""Running the control plane on one machine: an embedded AWS (moto), its event router, local wiring."""
