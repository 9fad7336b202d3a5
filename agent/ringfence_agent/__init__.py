"""The Ringfence in-VM agent: verifies bundles and programs the host firewall."""
