"""Flows: what was seen on the wire, resolved to workloads and labels, classified under policy.

:mod:`.records` the flow as it arrives (from an agent's report or a VPC Flow Log line),
:mod:`.vpclogs` the VPC Flow Logs parser (v2 default, custom v3–v5 formats),
:mod:`.resolve` addresses → workloads as of a flow's time, :mod:`.classify` the decision under
the active and the draft policy, :mod:`.aggregate` the (source group/role, destination
group/role, proto/port, decision) rows the store keeps and the map draws; from those rows,
:mod:`.suggest` the rules (and tests) an app's blocked flows call for, :mod:`.hygiene` what they
reveal about labels.
"""
