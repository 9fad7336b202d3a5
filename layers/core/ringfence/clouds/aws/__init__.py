"""The AWS control plane: adapters (EC2, S3, signing keys, enrollment, security groups) and services.

The services every cloud shares (the agent API, admin, compute, enrollment dispatch) are in
:mod:`ringfence.control`. One module per AWS service, each called by one thin Lambda handler
(``functions/<name>/app.py``):

=================  ==========================================================================
``ingest``         cloud events → normalized domain events → inventory (idempotent, newest wins)
``lifecycle``      Auto Scaling hooks: segment before serving, leave peers' sets before going
``reconcile``      scheduled full sync of every account/region (converges lost events)
``perimeter``      the coarse security groups per VPC and environment on every ENI, quota-checked;
                   reacts to changed workloads, the schedule converges and removes unused groups
``enroll``         the ``aws-iid`` and ``aws-sts`` enrollers (the IID signature, the STS replay)
``wiring``         :class:`~ringfence.control.wiring.Config` (environment) → clients, store, signer
=================  ==========================================================================

Every AWS call goes through :mod:`ringfence.clouds.aws.clients`, so tests run the same code
against a moto server.

Compute keeps the engine warm in a module global. The engine's revision counter lives in
DynamoDB (:class:`~ringfence.store.base.EngineHead`): revisions are reserved there *before*
anything is published (write-ahead), so versions stay monotonic and unique across cold starts,
retries and containers. A container whose engine is not exactly at the stored head (a cold
start, a failed publish, another container having moved on) rebuilds from the inventory at a
fresh revision and republishes every bundle.
"""
