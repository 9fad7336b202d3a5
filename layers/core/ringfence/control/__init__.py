"""The control-plane services every cloud shares, over the store and the publisher.

=================  ==========================================================================
``agents``         the agent API (docs/agent-api.md); ``api`` holds the HTTP plumbing
``enroll``         enrollment dispatch: method → :class:`~ringfence.control.enroll.Enroller`;
                   pairing keys (each cloud adds its identity proofs: ``clouds.aws.enroll``)
``credentials``    the agent-key proofs and the audit of credentials
``governance``     every observation's labels governed (privileged values, holds, grants, findings)
``admin``          provision policy, modes, quarantine, pairing keys — each audited
``compute``        inventory changes → engine → signed bundles and deltas → agents nudged
``launchgate``     a held launch released once its perimeter and its agent are in place
``publish``        the content-addressed documents for agents (the store of bytes is a subclass's)
``changes``        long-poll wake-ups from the engine head
``groupsend``      concurrent compute messages of one process sent together (group commit)
``artifact``       the agent wheel and installer as published
``wiring``         :class:`~ringfence.control.wiring.Config` and
                   :class:`~ringfence.control.wiring.BaseWiring`, which each cloud extends
=================  ==========================================================================

Nothing here imports a cloud SDK or ``ringfence.clouds``: ``clouds.<name>`` builds on this.
"""
