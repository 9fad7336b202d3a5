"""Exports of a policy and inventory to other systems' formats (Calico)."""
